"""In-batch contrastive loss, GradCache and the 2-process gathered-negatives equivalence (no LLM)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm2comp.training.contrastive import embed_and_backward, in_batch_loss
from llm2comp.training.distributed import average_gradients
from llm2comp_kernels import contrastive_loss


def _encoder(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(dropout), torch.nn.Tanh(),
                               torch.nn.Linear(12, 5))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _loss_fn(num_queries):
    return lambda emb: in_batch_loss(emb[:num_queries], emb[num_queries:], temperature=0.05)


def test_grad_cache_equals_one_large_batch_without_dropout():
    inputs = torch.randn(23, 6, generator=torch.Generator().manual_seed(1))  # 7 queries + 16 docs
    plain, cached = _encoder(0.0), _encoder(0.0)
    loss_plain = embed_and_backward(plain, [inputs], _loss_fn(7), cached=False, device=torch.device("cpu"))
    chunks = list(inputs.split(4))  # chunks straddle the query/doc boundary
    loss_cached = embed_and_backward(cached, chunks, _loss_fn(7), cached=True, device=torch.device("cpu"))
    torch.testing.assert_close(loss_cached, loss_plain)
    for a, b in zip(_grads(cached), _grads(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_cache_replays_dropout_masks():
    """With dropout, GradCache's gradient is that of the same chunks embedded with a graph:
    the second pass draws the masks of the first."""
    inputs = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    chunks = list(inputs.split(5))
    cached, reference = _encoder(0.3), _encoder(0.3)
    torch.manual_seed(7)
    loss_cached = embed_and_backward(cached, chunks, _loss_fn(6), cached=True, device=torch.device("cpu"))
    after_cached = torch.rand(3)
    torch.manual_seed(7)
    loss_ref = embed_and_backward(reference, chunks, _loss_fn(6), cached=False, device=torch.device("cpu"))
    after_ref = torch.rand(3)
    torch.testing.assert_close(loss_cached, loss_ref)
    for a, b in zip(_grads(cached), _grads(reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after_cached, after_ref)  # the RNG continues as after one pass


WORLD, B, NEG, D_IN = 2, 3, 2, 6


def _global_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B * (1 + NEG), D_IN, generator=g)


def _rank_docs(docs, rank):
    """Rank r's docs: its B positives then its B*NEG negatives (rows of the global doc tensor)."""
    pos = docs[rank * B:(rank + 1) * B]
    neg = docs[WORLD * B + rank * B * NEG:WORLD * B + (rank + 1) * B * NEG]
    return torch.cat([pos, neg])


def _worker(rank, init_file, out_file, cached):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    queries, docs = _global_batch()
    model = _encoder(0.0)
    q, d = queries[rank * B:(rank + 1) * B], _rank_docs(docs, rank)
    chunks = list(torch.cat([q, d]).split(4)) if cached else [q, d]
    loss = embed_and_backward(model, chunks, _loss_fn(B), cached=cached, device=torch.device("cpu"))
    params = list(model.parameters())
    average_gradients(params)
    losses = [torch.zeros(()) for _ in range(WORLD)]
    dist.all_gather(losses, loss)
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": [p.grad for p in params]}, out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("cached", [False, True])
def test_two_process_gathered_negatives_equal_single_process(tmp_path, cached):
    mp.spawn(_worker, args=(str(tmp_path / "pg"), str(tmp_path / "out.pt"), cached), nprocs=WORLD)
    got = torch.load(tmp_path / "out.pt")
    queries, docs = _global_batch()
    model = _encoder(0.0)
    # one process: all queries against all docs, ordered rank by rank as the gather orders them
    all_docs = torch.cat([_rank_docs(docs, r) for r in range(WORLD)])
    labels = torch.cat([torch.arange(B) + r * B * (1 + NEG) for r in range(WORLD)])
    loss = contrastive_loss(model(queries), model(all_docs), labels=labels, temperature=0.05)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach())
    for a, b in zip(got["grads"], _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
