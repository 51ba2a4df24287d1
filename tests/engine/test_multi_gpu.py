"""Tensor parallelism over NCCL on two GPUs of one host (scripts/gpu_check.sh runs these where the machine has two;
on one GPU: -m "gpu and not multigpu"). tests/engine/test_gpu_engine.py covers the sharded model on one GPU (gloo
ranks) and NCCL's collectives in the decode graphs (a one-rank group)."""
import pytest
import torch

import pagoda

from .test_gpu_engine import PROMPTS, _forced_deviation

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


@pytest.fixture(autouse=True)
def _need_two_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.fail("multigpu tests need two CUDA GPUs: deselect them with -m 'not multigpu'")


def test_two_gpus_in_cuda_graphs_match_one(monkeypatch):
    """The bundled model over cuda:0 and cuda:1 (NCCL, decode CUDA graphs with the collectives inside, async
    scheduling) against one GPU, both bf16, each teacher-forced through a float32 engine: the two-GPU engine's
    probabilities deviate no more than the one-GPU engine's (the yardstick); the worker sampled rank 0's tokens,
    sampled requests included."""
    monkeypatch.setenv("PAGODA_TP_RECORD", "1")  # (the worker keeps what finished, for the probe)
    greedy = pagoda.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=5)
    sampled = pagoda.SamplingParams(max_tokens=16, temperature=0.8, n=2, seed=3, ignore_eos=True)
    runs = {}
    for tp in (1, 2):
        llm = pagoda.LLM(dtype="bfloat16", num_kv_pages=2048, max_num_seqs=8, tensor_parallel_size=tp)
        runs[tp] = llm.generate(PROMPTS, greedy, use_tqdm=False) + llm.generate(PROMPTS[:1], greedy, use_tqdm=False)
        assert llm.engine.stats.cuda_graph_steps > 20
        if tp == 2:
            assert llm.engine.tp.backend == "nccl" and llm.engine.device == torch.device("cuda", 0)
            both = llm.generate(PROMPTS, [greedy, sampled, greedy, sampled], use_tqdm=False)
            want = {o.request_id: [c.token_ids for c in o.outputs] for o in runs[tp] + both}
            assert llm.engine._workers.request("probe") == [want]
        llm.shutdown()
        del llm
    ref32 = pagoda.LLM(dtype="float32", num_kv_pages=2048, max_num_seqs=8)
    dev = {tp: _forced_deviation(ref32, outs)[0] for tp, outs in runs.items()}
    mean = {k: sum(v) / len(v) for k, v in dev.items()}
    print("mean |p - p_float32| by tensor_parallel_size:", mean)
    assert mean[2] < 1.5 * mean[1] + 0.002 and max(dev[2]) < 0.06, (mean, max(dev[2]))
