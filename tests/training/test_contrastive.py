"""In-batch contrastive loss, GradCache and the 2-process gathered-negatives equivalence (no LLM)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm2comp.training.contrastive import embed_and_backward, in_batch_loss, text_keys
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
# Docs of the global batch that repeat an earlier one (rows of the global doc tensor: the WORLD * B positives, then
# the negatives): rank 1's first positive is rank 0's second negative, rank 1's last negative is rank 0's first
# positive, and two of rank 0's queries share a positive.
REPEATS = {B: WORLD * B + 1, WORLD * B + WORLD * B * NEG - 1: 0, 2: 1}


def _global_batch(repeated=False):
    g = torch.Generator().manual_seed(5)
    queries, docs = torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B * (1 + NEG), D_IN, generator=g)
    names = [f"doc {i}" for i in range(len(docs))]
    for copy, original in (REPEATS.items() if repeated else ()):
        docs[copy], names[copy] = docs[original], names[original]
    return queries, docs, names


def _rank_rows(rank):
    """Rank r's docs, as rows of the global doc tensor: its B positives then its B*NEG negatives."""
    return list(range(rank * B, (rank + 1) * B)) + list(range(WORLD * B + rank * B * NEG,
                                                              WORLD * B + (rank + 1) * B * NEG))


def _worker(rank, init_file, out_file, cached, repeated):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    queries, docs, names = _global_batch(repeated)
    model = _encoder(0.0)
    rows = _rank_rows(rank)
    q, d = queries[rank * B:(rank + 1) * B], docs[rows]
    keys = text_keys([names[i] for i in rows]) if repeated else None
    chunks = list(torch.cat([q, d]).split(4)) if cached else [q, d]
    loss = embed_and_backward(model, chunks, lambda emb: in_batch_loss(emb[:B], emb[B:], 0.05, keys), cached=cached,
                              device=torch.device("cpu"))
    params = list(model.parameters())
    average_gradients(params)
    losses = [torch.zeros(()) for _ in range(WORLD)]
    dist.all_gather(losses, loss)
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": [p.grad for p in params]}, out_file)
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a gloo thread destroyed there aborted the process now and then
    # ("terminate called without an active exception") after everything above had succeeded.
    os._exit(0)


@pytest.mark.parametrize("cached, repeated", [(False, False), (True, False), (False, True)])
def test_two_process_gathered_negatives_equal_single_process(tmp_path, cached, repeated):
    """Two ranks give the loss and gradients of one process on the whole batch; with doc keys, a doc text repeated
    anywhere in the global batch (within a rank or across ranks) is one column of that process's loss."""
    mp.spawn(_worker, args=(str(tmp_path / "pg"), str(tmp_path / "out.pt"), cached, repeated), nprocs=WORLD)
    got = torch.load(tmp_path / "out.pt")
    queries, docs, names = _global_batch(repeated)
    model = _encoder(0.0)
    # one process: all queries against all docs, ordered rank by rank as the gather orders them, each text once
    first = {}
    for i in (i for r in range(WORLD) for i in _rank_rows(r)):
        first.setdefault(names[i], i)
    kept, column = list(first.values()), {name: c for c, name in enumerate(first)}
    labels = torch.tensor([column[names[i]] for r in range(WORLD) for i in _rank_rows(r)[:B]])
    loss = contrastive_loss(model(queries), model(docs[kept]), labels=labels, temperature=0.05)
    loss.backward()
    assert len(kept) == len(docs) - (len(REPEATS) if repeated else 0)
    torch.testing.assert_close(got["loss"], loss.detach())
    for a, b in zip(got["grads"], _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_repeated_doc_texts_are_one_column():
    """One process: the docs' keys merge repeated texts, each query pointing at its positive's first copy; without
    keys the copies are separate columns (each other's negatives)."""
    g = torch.Generator().manual_seed(3)
    queries, docs = torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g)
    docs[2], docs[4] = docs[0], docs[1]  # query 2's positive is query 0's; a negative repeats query 1's positive
    keys = text_keys(["a", "b", "a", "c", "b", "d"])
    merged = in_batch_loss(queries, docs, 0.05, keys)
    expected = contrastive_loss(queries, docs[[0, 1, 3, 5]], labels=torch.tensor([0, 1, 0]), temperature=0.05)
    torch.testing.assert_close(merged, expected)
    assert not torch.allclose(in_batch_loss(queries, docs, 0.05), expected)
    assert text_keys(["a", "b", "a"]).tolist()[0] == text_keys(["a"]).item() != text_keys(["b"]).item()
