"""`TunedLauncher`: the autotuner runs once per tuning key, later launches go straight to the kernel with the config
it chose, the same grid and meta-parameters. Fakes stand in for the kernel and the autotuner (on a GPU the realistic
attention tests run the real ones, autotuned)."""

import itertools

import pytest
import torch
import triton

from llm2comp_kernels._triton_common import TunedLauncher


class _FakeKernel:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class _FakeAutotuner:
    def __init__(self, config):
        self.config, self.launches, self.best_config = config, [], None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.best_config = self.config
            self.launches.append((grid(self.config.all_kwargs()), args, kwargs))
        return run


def _grid(meta):
    return (triton.cdiv(100, meta["BLOCK_M"]), 6)


def test_tunes_once_per_key_then_launches_directly():
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2)
    kernel, tuner = _FakeKernel(), _FakeAutotuner(config)
    launch = TunedLauncher(kernel, tuner)
    launch(("a",), _grid, 1, 2, CAUSAL=True)
    assert len(tuner.launches) == 1 and not kernel.launches and launch.last is config
    launch(("a",), _grid, 3, 4, CAUSAL=True)
    assert len(tuner.launches) == 1
    (grid, args, kwargs), = kernel.launches
    assert grid == tuner.launches[0][0] == (4, 6) and args == (3, 4)
    assert kwargs == {"CAUSAL": True, **config.all_kwargs()} and kwargs["num_warps"] == 4
    launch(("b",), _grid, 5, CAUSAL=False)  # a new key is tuned again
    assert len(tuner.launches) == 2 and len(kernel.launches) == 1


def test_attention_key_separates_dtypes_and_length_buckets(monkeypatch):
    from llm2comp_kernels.memory_attention import triton as backend

    monkeypatch.setattr(backend, "triton_autotune", lambda: True)
    lens32, lens64 = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    def key(dtype, L, seq_lens=lens32, causal=False, dropout=False):
        return backend._tune_key(torch.zeros(1, 1, L, 64, dtype=dtype), seq_lens, 64, causal, backend._l_bucket(L),
                                 dropout)
    base = key(torch.bfloat16, 100)
    assert base == key(torch.bfloat16, 120)  # one length bucket (128)
    others = [key(torch.float16, 100), key(torch.bfloat16, 1000), key(torch.bfloat16, 100, lens64),
              key(torch.bfloat16, 100, causal=True), key(torch.bfloat16, 100, dropout=True)]
    assert len({base, *others}) == 6
    monkeypatch.setattr(backend, "triton_autotune", lambda: False)
    assert key(torch.bfloat16, 100) is None  # fixed blocks


def test_attention_bucket_and_block_d_are_powers_of_two():
    from llm2comp_kernels.memory_attention import triton as backend

    for n in range(1, 20000, 7):
        assert backend._l_bucket(n) == min(max(triton.next_power_of_2(n), 64), 8192)
        assert backend._block_d(n) == max(16, triton.next_power_of_2(n))


@pytest.mark.parametrize("name", ["fwd", "dq", "dkdv"])
def test_attention_launchers_wrap_the_autotuned_kernels(name):
    from llm2comp_kernels.memory_attention import triton as backend

    launcher = backend._LAUNCHERS[name]
    assert launcher.kernel is backend._KERNELS[name] and launcher.tuned.fn is backend._KERNELS[name]


@pytest.mark.parametrize("name", ["fwd", "dq", "dkdv"])
def test_attention_dropout_configs_only_for_dropout_launches(name):
    """The autotuner's pruner offers `_DROPOUT_CONFIGS` to DROPOUT launches only, and fp32 configs to fp32 inputs
    only."""
    from llm2comp_kernels.memory_attention import triton as backend

    tuner = backend._LAUNCHERS[name].tuned
    prune = tuner.early_config_prune
    dropout_ids = {id(c) for c in backend._DROPOUT_CONFIGS[name]}
    fp32_ids = {id(c) for c in backend._FP32_CONFIGS[name]}
    for dtype, dropout in itertools.product((torch.bfloat16, torch.float32), (False, True)):
        kept = {id(c) for c in prune(tuner.configs, {"Q": torch.zeros(1, dtype=dtype)}, BLOCK_D=256,
                                     DROPOUT=dropout)}
        assert kept, (dtype, dropout)
        assert kept.isdisjoint(dropout_ids) or dropout
        assert (kept <= fp32_ids) == (dtype == torch.float32)
    bf16_dropout = {id(c) for c in prune(tuner.configs, {"Q": torch.zeros(1, dtype=torch.bfloat16)}, BLOCK_D=256,
                                         DROPOUT=True)}
    assert dropout_ids <= bf16_dropout
