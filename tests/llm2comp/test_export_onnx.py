"""ONNX export (`llm2comp.export.onnx`) and its onnxruntime runner (`OnnxEncoder`) against `LLM2Comp.encode`."""

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from llm2comp import LLM2Comp, is_patched  # noqa: E402
from llm2comp.export import onnx as onnx_export  # noqa: E402
from llm2comp.export.onnx import ONNX_CONFIG_NAME, OnnxEncoder, export_onnx  # noqa: E402
from llm2comp.quantization import PRECISIONS, quantize_embeddings  # noqa: E402
from tests.tiny_models import as_trained

TOL = 1e-4  # float32 graph vs float32 model: the same sums in another order
TEXTS = ["Bushfires burned across New South Wales.", "Rain.",
         "The cricket team won the test match in Perth after a long day in the sun. " * 4,
         "Shares fell on the stock market today after the bank raised interest rates.", "", "Fires near Sydney."]


def _assert_close(a, b, tol=TOL):
    assert a.shape == b.shape and a.dtype == np.float32
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    assert diff <= tol, f"max abs difference {diff:.3e} > {tol:.0e}"


@pytest.fixture(scope="module")
def trained(_tiny_encoder):
    return as_trained(copy.deepcopy(_tiny_encoder))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(model, OnnxEncoder of its export)."""
    directory = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(trained, directory)
    return trained, OnnxEncoder(directory)


def test_matches_encode_and_leaves_the_model_alone(_tiny_encoder, tmp_path):
    """Embeddings equal `encode`'s in batches that pad and alone; the LoRA (folded and live) shows in them; the
    model exported is the caller's as it was."""
    model = as_trained(copy.deepcopy(_tiny_encoder))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    path = export_onnx(model, tmp_path / "out")
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert requires_grad == {n: p.requires_grad for n, p in model.named_parameters()}
    assert is_patched(model.model) and not model.training

    runner = OnnxEncoder(tmp_path / "out")
    expected = model.encode(TEXTS, batch_size=32, convert_to_numpy=True)
    for batch_size in (1, 3, 32):  # 3: batches of unequal rows, padded
        _assert_close(runner.encode(TEXTS, batch_size=batch_size), expected)
    with model.model.disable_adapter():  # without the live LoRA: far from the export
        assert np.abs(model.encode(TEXTS) - expected).max() > 100 * TOL


def test_graph_inputs_outputs_and_files(exported, tmp_path):
    import onnx

    model, runner = exported
    files = {p.name for p in runner.directory.iterdir()}
    assert {"model.onnx", ONNX_CONFIG_NAME, "tokenizer.json"} <= files and "model.onnx.data" not in files
    config = json.loads((runner.directory / ONNX_CONFIG_NAME).read_text())
    assert config["pooling"] == "memory" and config["num_memory_tokens"] == 4
    assert config["memory_token_ids"] == model.memory_token_ids and config["bos_ids"] == model.bos_ids
    assert config["hidden_size"] == 64 and config["max_length"] == 512
    graph = onnx.load(str(runner.directory / "model.onnx")).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert [(i.name, dims(i), i.type.tensor_type.elem_type) for i in graph.input] == [
        ("input_ids", ["batch", "sequence"], onnx.TensorProto.INT64),
        ("attention_mask", ["batch", "sequence"], onnx.TensorProto.INT64)]
    assert [(o.name, dims(o), o.type.tensor_type.elem_type) for o in graph.output] == [
        ("embeddings", ["batch", 64], onnx.TensorProto.FLOAT)]
    vocab_rows = [i for i in graph.initializer if list(i.dims) == [len(model.tokenizer), 64]]
    assert len(vocab_rows) == 1  # the input embedding; the (untied) LM head is not in the graph


def test_tokenize_matches_the_model(exported):
    model, runner = exported
    for kwargs in ({}, {"instruction": "Query: "}, {"max_length": 16}):
        ours = runner.tokenize(TEXTS, **kwargs)
        theirs = model.tokenize(TEXTS, **kwargs)
        assert ours.keys() == dict(theirs).keys()
        for name, value in ours.items():
            assert value.dtype == np.int64
            np.testing.assert_array_equal(value, theirs[name].numpy(), err_msg=name)


def test_instruction_truncation_and_normalize(exported):
    model, runner = exported
    query = runner.encode(TEXTS, instruction="Query: ")
    _assert_close(query, model.encode(TEXTS, instruction="Query: "))
    assert np.abs(query - runner.encode(TEXTS)).max() > 100 * TOL
    _assert_close(runner.encode(TEXTS, max_length=12, batch_size=2), model.encode(TEXTS, max_length=12))
    unit = runner.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    _assert_close(unit, model.encode(TEXTS, normalize_embeddings=True))


def test_shapes_and_conversions(exported):
    model, runner = exported
    one = runner.encode("Rain fell on Sydney.")
    assert isinstance(one, np.ndarray) and one.shape == (64,) and one.dtype == np.float32
    _assert_close(one, model.encode("Rain fell on Sydney."))
    assert runner.encode([]).shape == (0, 64)
    _assert_close(runner.encode(np.array(TEXTS[:2])), runner.encode(TEXTS[:2]), tol=0)
    tensor = runner.encode(TEXTS[:3], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 64) and tensor.dtype == torch.float32
    rows = runner.encode(TEXTS[:3], convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 3 and rows[0].shape == (64,)
    single = runner.encode("Rain.", convert_to_numpy=False)
    assert isinstance(single, torch.Tensor) and single.shape == (64,)


def test_encode_defaults_and_options_as_the_model(trained, tmp_path):
    """The model's prompts, default_prompt_name and truncate_dim go with the export and are the runner's defaults;
    prompt_name, prompt, truncate_dim (then normalize) give what `model.encode` gives with them."""
    model = copy.deepcopy(trained)
    model.prompts, model.default_prompt_name, model.truncate_dim = {"query": "Query: ", "doc": "Doc: "}, "query", 16
    export_onnx(model, tmp_path)
    config = json.loads((tmp_path / ONNX_CONFIG_NAME).read_text())
    assert (config["prompts"], config["default_prompt_name"], config["truncate_dim"]) == (model.prompts, "query", 16)
    runner = OnnxEncoder(tmp_path)
    assert (runner.prompts, runner.default_prompt_name, runner.truncate_dim) == (model.prompts, "query", 16)
    assert runner.encode(TEXTS).shape == (len(TEXTS), 16) and runner.encode(TEXTS[0]).shape == (16,)
    for kwargs in ({}, {"prompt_name": "doc"}, {"prompt": "Other: "}, {"instruction": ""},
                   {"truncate_dim": 8, "normalize_embeddings": True}, {"truncate_dim": 64}):
        _assert_close(runner.encode(TEXTS, **kwargs), model.encode(TEXTS, **kwargs))
    assert np.abs(runner.encode(TEXTS, prompt="") - runner.encode(TEXTS)).max() > 100 * TOL  # the default applies
    with pytest.warns(UserWarning, match="prompt_name 'doc' is ignored"):
        runner.encode(TEXTS[:1], prompt_name="doc", prompt="")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_as_the_model(exported, precision):
    """`quantize_embeddings` of the call's float embeddings, as `model.encode` quantizes its own."""
    model, runner = exported
    floats = runner.encode(TEXTS, normalize_embeddings=True)
    ours = runner.encode(TEXTS, normalize_embeddings=True, precision=precision)
    np.testing.assert_array_equal(ours, quantize_embeddings(floats, precision))
    theirs = model.encode(TEXTS, normalize_embeddings=True, precision=precision)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    # float32 rounding may move a value across the edge of an int8 level
    assert np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max() <= (1 if precision.endswith("int8") else 0)
    tensor = runner.encode(TEXTS, normalize_embeddings=True, precision=precision, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and (tensor.numpy() == ours).all()


def test_an_export_without_encode_defaults(exported, tmp_path):
    """An export made before prompts and truncate_dim were saved runs without them; bad values name the file."""
    directory = shutil.copytree(exported[1].directory, tmp_path / "old")
    config = json.loads((directory / ONNX_CONFIG_NAME).read_text())
    for key in ("prompts", "default_prompt_name", "truncate_dim"):
        del config[key]
    (directory / ONNX_CONFIG_NAME).write_text(json.dumps(config))
    old = OnnxEncoder(directory)
    assert (old.prompts, old.default_prompt_name, old.truncate_dim) == ({}, None, None)
    _assert_close(old.encode(TEXTS), exported[1].encode(TEXTS), tol=0)
    for bad in ({"truncate_dim": 65}, {"prompts": {"q": 1}}, {"default_prompt_name": "q"}):
        (directory / ONNX_CONFIG_NAME).write_text(json.dumps({**config, **bad}))
        with pytest.raises(ValueError, match=f"{ONNX_CONFIG_NAME}: .*(truncate_dim|prompts|default_prompt_name)"):
            OnnxEncoder(directory)


@pytest.mark.parametrize("sentences, kwargs, exc, match", [
    (5, {}, TypeError, "sentences must be a str"),
    (["ok", 3], {}, TypeError, r"sentences\[1\] is int"),
    (b"text", {}, TypeError, "bytes"),
    ({"a": "b"}, {}, TypeError, "sentences must be a str"),
    (["ok"], {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    (["ok"], {"batch_size": 2.0}, TypeError, "batch_size must be an int"),
    (["ok"], {"max_length": True}, TypeError, "max_length must be an int"),
    (["ok"], {"max_length": 4}, ValueError, "max_length=4 leaves no room"),
    (["ok"], {"instruction": ["Query: "]}, TypeError, "instruction must be a str"),
    (["ok"], {"normalize_embeddings": "yes"}, TypeError, "normalize_embeddings must be a bool"),
    (["ok"], {"show_progress_bar": 1}, TypeError, "show_progress_bar must be a bool or None"),
    (["ok"], {"pooling": "mean"}, TypeError, "pooling"),
    (["ok"], {"prompt_name": "nope"}, ValueError, "prompt_name 'nope' is not one of the model's prompts"),
    (["ok"], {"prompt": "a: ", "instruction": "b: "}, ValueError, "not both"),
    (["ok"], {"prompt": 3}, TypeError, "prompt must be a str"),
    (["ok"], {"truncate_dim": 0}, ValueError, r"truncate_dim must be in 1\.\.64"),
    (["ok"], {"truncate_dim": 2.0}, TypeError, "truncate_dim must be an int"),
    (["ok"], {"precision": "fp8"}, ValueError, "precision must be one of"),
    ("ok", {"precision": "int8"}, ValueError, "more than one"),
])
def test_bad_arguments(exported, sentences, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        exported[1].encode(sentences, **kwargs)


def test_the_runner_imports_no_peft_nor_transformers_until_it_loads():
    code = ("import sys, llm2comp.export.onnx_runtime; "
            "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_bad_directories_and_models(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxEncoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{ONNX_CONFIG_NAME} is missing"):
        OnnxEncoder(tmp_path)
    (tmp_path / ONNX_CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an llm2comp-onnx config"):
        OnnxEncoder(tmp_path)
    with pytest.raises(TypeError, match="model must be an LLM2Comp"):
        export_onnx(exported[0].model, tmp_path / "x")
    with pytest.raises(ValueError, match="opset must be a positive int"):
        export_onnx(exported[0], tmp_path / "x", opset=0)


@pytest.mark.parametrize("kind, pooling", [("qwen2", "mean"), ("gemma", "last")])
def test_other_poolings_and_models(tiny_dirs, tmp_path, kind, pooling):
    """Mean pooling (a third input, where the instruction ends) on a tokenizer without BOS, last-token pooling on
    Gemma; both as `encode` gives them, with and without an instruction."""
    model = LLM2Comp.from_pretrained(str(tiny_dirs[kind]), num_memory_tokens=3, lora_rank=4, lora_dropout=0.0,
                                     pooling=pooling)
    as_trained(model, seed=3)
    export_onnx(model, tmp_path / "out")
    runner = OnnxEncoder(tmp_path / "out")
    texts = [t for t in TEXTS if t]
    assert runner.config["inputs"][2:] == (["text_start"] if pooling == "mean" else [])
    for instruction in (None, "Query: "):
        _assert_close(runner.encode(texts, instruction=instruction, batch_size=2),
                      model.encode(texts, instruction=instruction))
    with pytest.raises(ValueError, match=rf"sentences\[1\] is empty.*'{pooling}' pooling"):
        runner.encode(["ok", " "])


def test_bfloat16_model_external_data(_tiny_encoder, tmp_path, monkeypatch):
    """A bf16 model gives a float32 graph (its weights exactly, upcast); weights over the threshold go to
    model.onnx.data, which onnxruntime reads; a second export into the directory replaces the first's files."""
    model = as_trained(copy.deepcopy(_tiny_encoder)).to(torch.bfloat16)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    export_onnx(model, tmp_path)
    assert (tmp_path / "model.onnx.data").is_file()
    expected = copy.deepcopy(model).float().encode(TEXTS)
    _assert_close(OnnxEncoder(tmp_path).encode(TEXTS, batch_size=4), expected)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1 << 30)
    export_onnx(model, tmp_path)
    assert not (tmp_path / "model.onnx.data").exists()
    _assert_close(OnnxEncoder(tmp_path).encode(TEXTS), expected)
