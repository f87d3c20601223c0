"""Benchmark evaluation with vLLM: pass@k / avg@k metrics, benchmark loading, a resumable runner, `aapo-eval`."""

from aapo_megatron.eval.benchmarks import LAYOUTS, Benchmark, BenchmarkSpec, EvalInputError, load_benchmark
from aapo_megatron.eval.metrics import benchmark_metrics, default_ks, pass_at_k

__all__ = ["LAYOUTS", "Benchmark", "BenchmarkSpec", "EvalInputError", "benchmark_metrics", "default_ks",
           "load_benchmark", "pass_at_k"]
