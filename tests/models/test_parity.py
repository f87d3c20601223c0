"""Logit parity: tiny random HF models loaded into Megatron via the mapping, at TP=1, TP=2 and PP=2 (gloo).

Llama (llama3 rope scaling), Qwen2 with qkv bias (tied and untied), Qwen3 (qk-norm, head_dim != H/heads),
all with 4 query heads per KV head, on a batch with right and left padding; fp32 logits within 1e-4.
The gathered HF state dict (TP all-gather + PP broadcast) equals the loaded one bitwise.
"""

from __future__ import annotations

import pytest

from tests.models.layouts import LAYOUT_IDS, LAYOUTS, run_layout
from tests.models.tiny_hf import KINDS, ODD_VOCAB_KIND

# One spawned job per layout (shared with test_gpt.py), 15-60 s each depending on machine load.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", KINDS + (ODD_VOCAB_KIND,))
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_logits_match_hf(tp: int, pp: int, kind: str):
    results = [r["parity"][kind] for r in run_layout(tp, pp)]
    last = [r for r in results if r["max_diff"] is not None]
    assert len(last) == tp  # every TP rank of the last stage compared
    for r in last:
        assert r["ref_scale"] > 0.1  # the comparison is not between near-zero logits
        assert r["max_diff"] < 1e-4, f"{kind} tp={tp} pp={pp}: max |megatron - hf| = {r['max_diff']:.3e}"


@pytest.mark.parametrize("kind", KINDS + (ODD_VOCAB_KIND,))
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_gathered_hf_state_dict_is_bitwise(tp: int, pp: int, kind: str):
    for r in run_layout(tp, pp):
        assert r["parity"][kind]["roundtrip_ok"], f"{kind}: gathered HF state dict differs at {r['parity'][kind]['layout']}"


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_layout_and_vocab_padding(tp: int, pp: int):
    """The job really ran at this TP/PP; vocab 97 is padded to a multiple of TP inside Megatron only."""
    results = run_layout(tp, pp)
    coords = sorted((r["parity"]["llama"]["layout"].tp_rank, r["parity"]["llama"]["layout"].pp_rank) for r in results)
    assert coords == sorted((t, p) for t in range(tp) for p in range(pp))
    assert {r["parity"][ODD_VOCAB_KIND]["vocab_rows"] for r in results} == {98 if tp == 2 else 97}
