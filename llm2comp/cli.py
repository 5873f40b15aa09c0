"""The ``llm2comp`` command: ``encode``, ``eval``, ``merge``, ``data``, ``train``, ``recipe``, ``demo``, ``bench``.

Each ``add_*_parser`` function takes the argparse subparsers object, adds its command's parser and sets
``func`` (called with the parsed namespace; a non-zero int return is the exit code). Heavy imports (torch,
transformers) happen inside the ``func`` handlers, so ``--help`` is quick (tested).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

from .data import text_lines
from .pooling import POOLINGS
from .quantization import PRECISIONS
from .training.cli import add_demo_parser, add_recipe_parser, add_train_parser


def positive_int(value: str) -> int:
    """argparse type: an int >= 1."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _one_line_errors(run):
    """A handler whose bad-input errors (ValueError, TypeError, OSError) print one line and exit 2."""
    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, TypeError, OSError) as exc:
            print(f"llm2comp {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return wrapped


def _npy_path(output: str) -> Path:
    """Where ``np.save`` writes `output` (it appends ``.npy``); its folder must exist."""
    path = Path(output)
    path = path if path.suffix == ".npy" else path.with_name(path.name + ".npy")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--output folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"--output {path} is a directory")
    return path


def _add_base_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", default=None,
                        help="where the base model of an LLM2Comp directory is now, if it moved since training")


def _add_dtype_and_base_model_args(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """``--dtype`` and ``--base-model`` of the commands that rewrite a trained directory (merge, export)."""
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help=dtype_help)
    _add_base_model_arg(parser)


def _add_model_args(parser: argparse.ArgumentParser, several_devices: bool = False) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="LLM2Comp directory, transformers model (hub id or local dir) or smollm2-135m")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model, for GGUF checkpoints")
    _add_base_model_arg(parser)
    several = "; several, comma-separated (cuda:0,cuda:1), encode at once, a worker process each" * several_devices
    parser.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1 (default: cuda if available){several}")
    parser.add_argument("--batch-size", type=positive_int, default=16)


def _load(args: argparse.Namespace, device: str | None = None):
    import torch

    from .model import LLM2Comp
    from .multi_process import checked_device

    device = checked_device(device or args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    return LLM2Comp.from_pretrained(args.model, device=device, base_model=args.base_model, **extra)


@_one_line_errors
def _run_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from .multi_process import checked_device

    texts = list(args.texts)
    if args.input:  # every "\n"-ended line is a text (blank ones too), so row i of the output is line i
        texts += text_lines(Path(args.input).read_bytes().decode("utf-8-sig"))  # no newline translation
    if not texts:
        print("llm2comp encode: no texts (give them as arguments or with --input)", file=sys.stderr)
        return 2
    output = _npy_path(args.output) if args.output else None
    several = args.device and "," in args.device  # checked before the model loads
    devices = [checked_device(d) for d in args.device.split(",") if d.strip()] if several else None
    # with several devices the model loads on the CPU, from where it is sent to the workers
    emb = _load(args, "cpu" if devices else None).encode(
        texts, prompt_name=args.prompt_name, instruction=args.instruction, batch_size=args.batch_size,
        max_length=args.max_length, pooling=args.pooling, normalize_embeddings=args.normalize,
        truncate_dim=args.truncate_dim, precision=args.precision, device=devices)
    if output:
        np.save(output, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} {emb.dtype} embeddings to {output}")
    else:
        for row in emb:
            print(json.dumps([round(float(x), 6) if emb.dtype == np.float32 else int(x) for x in row]))
    return 0


def add_encode_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("encode", help="embed texts (one JSON list per line, or a .npy file)")
    _add_model_args(parser, several_devices=True)
    parser.add_argument("texts", nargs="*", help="texts to embed")
    parser.add_argument("--input", help="UTF-8 file with one text per line (row i of the output is line i)")
    parser.add_argument("--output", help="write an [n, D] .npy file instead of printing (.npy appended if missing)")
    parser.add_argument("--instruction", "--prompt", default=None, help="prefix for every text, e.g. 'Query: '")
    parser.add_argument("--prompt-name", default=None, help="a prompt saved with the model, by name (e.g. query)")
    parser.add_argument("--pooling", choices=POOLINGS, default=None, help="default: the model's (memory)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="tokens per text, BOS, instruction and memory tokens included")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--truncate-dim", type=positive_int, default=None,
                        help="keep the first N dimensions, before --normalize (default: the model's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="quantize as sentence-transformers does (int8/uint8 ranges from these texts)")
    parser.set_defaults(func=_run_encode)
    return parser


def _result_name(model: str) -> str:
    """A file-name-safe name for a model argument (its last path part)."""
    name = Path(model.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@_one_line_errors
def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_suite, format_table, load_tasks, write_result

    tasks = load_tasks(args.tasks, args.data_dir)  # a bad --tasks or --data-dir fails now, before the model loads
    out = args.out or (f"benchmarks/results/quality_{args.name}.json" if args.name else None)
    model = _load(args)
    poolings = POOLINGS if args.pooling == "all" else (args.pooling,)
    print(f"quality suite: {', '.join(f'{t.name} ({t.kind})' for t in tasks)}; model {args.model}", flush=True)
    result = evaluate_suite(model, tasks, pooling=poolings, batch_size=args.batch_size,
                            baselines=not args.no_baselines, baseline_model=args.baseline_model,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    print(f"{result['wall_s']:.1f} s")
    result["environment"]["command"] = shlex.join(["llm2comp", *(sys.argv[1:] if args.argv is None else args.argv)])
    if out:
        path = write_result(result, out, model=args.model, name=args.name or _result_name(args.model))
        print(f"wrote {path}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="quality suite: Lee similarity, fortunes topics, GCIDE clusters, man page retrieval, with "
                     "baselines (base model mean / last pooling, TF-IDF)")
    _add_model_args(parser)
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks (default all): lee, fortunes, gcide, manpages")
    parser.add_argument("--pooling", choices=(*POOLINGS, "all"), default=None,
                        help="pooling of the model under test (default: the model's; all: a row each)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the model's rows (no base mean / last, no TF-IDF)")
    parser.add_argument("--baseline-model", default=None,
                        help="base model for the mean / last baselines (default: an untrained --model itself, "
                             "else the base named in its directory)")
    parser.add_argument("--name", default=None,
                        help="name of this run: writes benchmarks/results/quality_NAME.json unless --out is given")
    parser.add_argument("--out", default=None, help="write the result as JSON to this path")
    parser.add_argument("--data-dir", default=None,
                        help="folder with lee.cor, similarities0-1.txt (default: ../shared/data/lee or gensim)")
    parser.set_defaults(func=_run_eval)
    return parser


def _model_and_new_output(args: argparse.Namespace):
    """(the trained model `args.model` on the CPU in `args.dtype`, the output directory): refused before the
    model loads if the output is not new or empty."""
    from .outputs import require_empty

    output = Path(args.output)
    require_empty(output)
    from .model import LLM2Comp

    model = LLM2Comp.from_pretrained(args.model, device="cpu", dtype=None if args.dtype == "auto" else args.dtype,
                                     base_model=args.base_model)
    return model, output


@_one_line_errors
def _run_merge(args: argparse.Namespace) -> int:
    model, output = _model_and_new_output(args)
    model.merge_and_save(output)
    print(f"wrote the merged model ({model.model.dtype}) to {output}")
    return 0


EXPORT_FORMATS = ("hf", "onnx")


@_one_line_errors
def _run_export(args: argparse.Namespace) -> int:
    model, output = _model_and_new_output(args)
    if args.format == "hf":
        from .export.hf import export_hf

        export_hf(model, output)
        st = "" if model.pooling == "last" else f", or SentenceTransformer({str(output)!r})"
        print(f"wrote a transformers model to {output} (AutoModel + the pooling in its README.md{st}; checked "
              "against llm2comp's embeddings, with sentence-transformers too where it is installed)")
    else:
        from .export.onnx import export_onnx

        export_onnx(model, output)
        print(f"wrote an ONNX graph to {output} (llm2comp.export.onnx_runtime.OnnxEncoder runs it)")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="write a trained encoder for serving without llm2comp: a "
                                                  "transformers directory (hf) or one ONNX graph (onnx)")
    parser.add_argument("model", help="LLM2Comp directory (what `llm2comp train` wrote)")
    parser.add_argument("output", help="new directory to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="hf",
                        help="hf: merged weights, bidirectional via config.json's is_causal, a tokenizer that adds "
                             "the memory tokens, the pooling in README.md; onnx: input_ids + attention_mask -> "
                             "embeddings, float32 (default: hf)")
    _add_dtype_and_base_model_args(parser, "dtype to load and export in (default: the checkpoint's; the onnx "
                                           "graph is float32)")
    parser.set_defaults(func=_run_export)
    return parser


CORPORA = ("wordnet", "lee-background", "general", "general-pairs", "package-pairs")  # what `llm2comp data` writes


def _is_pairs(corpus: str) -> bool:
    return corpus.endswith("-pairs")


def _corpus_lines(name: str) -> list[str]:
    """The lines of training corpus `name` (one of `CORPORA`): texts, or JSON rows for the -pairs corpora."""
    from .data import lee_background_documents
    from .data.packages import package_pairs
    from .data.wordnet import general_pairs, general_texts, wordnet_texts

    if _is_pairs(name):
        rows = {"general-pairs": general_pairs, "package-pairs": package_pairs}[name]()
        return [json.dumps(row, ensure_ascii=False) for row in rows]
    return {"wordnet": wordnet_texts, "lee-background": lee_background_documents, "general": general_texts}[name]()


@_one_line_errors
def _run_data(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if _is_pairs(args.corpus) and output.suffix != ".jsonl":
        raise ValueError(f"output {output}: {args.corpus} writes jsonl rows, so name a .jsonl file")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output folder {output.parent} does not exist")
    lines = _corpus_lines(args.corpus)
    lines = lines[:args.limit] if args.limit else lines
    output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} {'rows' if _is_pairs(args.corpus) else 'texts'} to {output}")
    return 0


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("data", help="write a training corpus: a text file, one text per line (a jsonl "
                                                "file of query/positive rows for general-pairs and package-pairs)")
    parser.add_argument("corpus", choices=CORPORA, help="wordnet: WordNet 3.0 synsets, general English (about "
                        "117k lines; Debian's wordnet-base, fetched with apt-get download); lee-background: the 300 "
                        "Lee background news documents (gensim's test data); general: those 300 and 1200 WordNet "
                        "passages of one topic each, about 100 tokens long (the CPU recipe's corpus); "
                        "general-pairs: stage-3 rows cut from general, a news document's first sentence -> the "
                        "rest, a synset's definition -> the rest of its passage; package-pairs: 1500 Debian package "
                        "descriptions, a synopsis -> the first paragraph of its description (bookworm's "
                        "Translation-en.xz, downloaded once from deb.debian.org or $LLM2COMP_DEBIAN_MIRROR; rows "
                        "near the man-page task's text are left out, which needs that task's Debian packages)")
    parser.add_argument("output", help="the .txt (.jsonl for general-pairs and package-pairs) file to write "
                                       "(replaced if it exists)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N texts (rows for the pairs), in a fixed order")
    parser.set_defaults(func=_run_data)
    return parser


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("merge", help="write a trained encoder with its LoRA adapters merged into the "
                                                 "weights, for serving")
    parser.add_argument("model", help="LLM2Comp directory (what `llm2comp train` wrote)")
    parser.add_argument("output", help="new directory for the merged model (loads with LLM2Comp.from_pretrained "
                                       "and sentence-transformers)")
    _add_dtype_and_base_model_args(parser, "weights' dtype (default: the checkpoint's)")
    parser.set_defaults(func=_run_merge)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks":  # a module the benchmarks need is missing: say which
            raise
        # benchmarks/ ships with the repository, not with the package: only a checkout's root can import it
        print("llm2comp bench: the benchmarks are not importable here; from the root of a repository checkout, "
              f"run: {shlex.join(['python', '-m', 'benchmarks', *args.bench_args])}", file=sys.stderr)
        return 2
    return bench_main(args.bench_args)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="kernel benchmarks (python -m benchmarks, from a checkout)",
                                   add_help=False)
    # Its arguments (--quick, --only, ...) pass through unparsed: see `main`.
    parser.set_defaults(func=_run_bench, passthrough=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2comp", description="LLM2Comp text encoders on fused kernels")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in (add_encode_parser, add_eval_parser, add_merge_parser, add_export_parser, add_data_parser,
                       add_train_parser, add_recipe_parser, add_demo_parser, add_bench_parser):
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if getattr(args, "passthrough", False):
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
