"""Tasks for EleutherAI's lm-evaluation-harness over held-out documents of some's corpora.

    write_lm_eval_tasks("tasks", model_dir="runs/tiny/model")   # some lm-eval-task tasks --model runs/tiny/model
    # lm_eval --model hf --model_args pretrained=runs/tiny/model,trust_remote_code=True \\
    #         --tasks some_heldout --include_path tasks

Two tasks per corpus, both tagged ``some_heldout``, over one JSONL file of items (one
document each, LAMBADA-style: the document up to its last word is the context):

- ``some_<corpus>_lastword`` (loglikelihood): the last word; ``acc`` (it is the greedy
  continuation) and ``perplexity`` of its tokens;
- ``some_<corpus>_lastword_choice`` (multiple choice): the last word among four, the other
  three the last words of other documents; ``acc`` and ``acc_norm`` (chance 0.25).

The documents are a validation split (:func:`some.data.split_indices`): with a model
directory, its run's (``training.json``: the run's corpus, seed and sizes, so never a
training document; of another corpus, documents the run never saw), else the split of
a run with the default seed and sizes; TinyStories' are its own validation split
(``tinystories:DIR``: a local copy). The YAML files name their JSONL by absolute path
(``datasets``' ``json`` loader: lm_eval needs no network): write the tasks again to move them.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..data import load_corpus, load_tinystories, parse_source, parse_tinystories_options, split_indices
from ..errors import ConfigError
from ..files import PathLike, atomic_write
from .config import SoMEConfig
from .export import TRAINING_FILE, training_record

__all__ = ["LM_EVAL_TAG", "TaskFiles", "heldout_items", "lm_eval_command", "write_lm_eval_tasks"]

LM_EVAL_TAG = "some_heldout"
MIN_CONTEXT_WORDS = 4  # a context of fewer words asks too little of the model
CHOICES = 4
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters and digits, with inner apostrophes


@dataclass
class TaskFiles:
    """What :func:`write_lm_eval_tasks` wrote for one corpus."""

    source: str
    split: str  # where the documents come from, in words
    items: int
    data: Path  # the JSONL file
    tasks: dict[str, Path]  # task name -> its YAML file


def _split_lastword(text: str) -> tuple[str, str] | None:
    """(context, target): the document before its last word, and the whitespace and word
    (trailing punctuation dropped); None for documents too short to ask."""
    words = list(_WORD.finditer(text))
    if not words:
        return None
    last = words[-1]
    context = text[:last.start()].rstrip()
    if len(_WORD.findall(context)) < MIN_CONTEXT_WORDS:
        return None
    return context, text[len(context):last.end()]


def heldout_items(documents: list[str], n: int, seed: int) -> list[dict]:
    """Up to ``n`` items (``context``, ``target``, ``choices``, ``label``) from ``documents`` in
    their order; the distractors are other items' words, drawn with ``seed``."""
    items = []
    for doc in documents:
        split = _split_lastword(doc.strip())
        if split is not None:
            items.append({"context": split[0], "target": split[1]})
        if len(items) == n:
            break
    rng = random.Random(seed)
    words = sorted({it["target"].strip() for it in items})
    for it in items:
        word = it["target"].strip()
        space = it["target"][:len(it["target"]) - len(word)]
        others = [w for w in words if w.lower() != word.lower()]
        if len(others) < CHOICES - 1:
            raise ConfigError(f"too few different last words ({len(others) + 1}) for {CHOICES} choices: "
                              f"give more items")
        choices = [word, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        it["choices"], it["label"] = [space + w for w in choices], choices.index(word)
    return items


def _name(source: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", source.lower()).strip("_")[:40] or "corpus"


def _documents(source: str, run: dict, n: int) -> tuple[list[str], str, int]:
    """(validation documents, the split in words, its seed) of ``source``."""
    try:
        kind, arg = parse_source(source)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    default = SoMEConfig()
    seed = run.get("seed", default.seed)
    if kind == "tinystories":  # its own validation split, as a run takes it (some.data.load_tinystories)
        try:
            options = parse_tinystories_options(arg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        n_val = run.get("val_subset_size", n) if source == run.get("data_source") else n
        return (load_tinystories("validation", n_val, seed, **options),
                f"TinyStories' validation split ({n_val} stories, seed {seed})", seed)
    try:
        corpus = load_corpus(source)  # (a missing corpus: CorpusUnavailableError, which names the fix)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if source == run.get("data_source"):  # the run's own validation split
        n_train, n_val = run.get("train_subset_size", 1), run.get("val_subset_size", n)
        where = f"the run's validation split (seed {seed}, {n_train} train / {n_val} val documents)"
    elif run:  # another corpus than the run's: none of it was trained on
        n_train, n_val = 1, n * 2
        where = f"documents the run never saw (seed {seed})"
    else:
        n_train, n_val = default.train_subset_size, default.val_subset_size
        where = f"the validation split of a run with the default split (seed {seed}, {n_train} / {n_val})"
    _, val = split_indices(len(corpus.documents), n_train, n_val, seed, name=repr(source))
    return [corpus.documents[i] for i in val], where, seed


def _task(name: str, data: Path, kind: str, source: str, where: str) -> dict:
    task = {"task": name, "tag": [LM_EVAL_TAG], "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "doc_to_text": "context", "target_delimiter": "",
            "metadata": {"version": 1.0, "source": source, "documents": where}}
    if kind == "lastword":
        task.update(output_type="loglikelihood", doc_to_target="target",
                    metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                 {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    else:
        task.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="label",
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                 {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    return task


def write_lm_eval_tasks(out_dir: PathLike, *, model_dir: PathLike | None = None, sources: list[str] | None = None,
                        items: int = 200) -> list[TaskFiles]:
    """Write the tasks of the module docstring for each corpus in ``sources`` (default: the
    model's corpus, or ``fortunes`` and ``bible``) to ``out_dir``, ``items`` per task at most."""
    import yaml

    if isinstance(items, bool) or not isinstance(items, int) or items < CHOICES:
        raise ConfigError(f"items must be an int >= {CHOICES}, got {items!r}")
    run: dict = {}
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise ConfigError(f"model directory not found: {model_dir}")
        run = training_record(Path(model_dir))
        if not run and not sources:
            raise ConfigError(f"{model_dir} has no {TRAINING_FILE} (the run's corpus and split): give --data SOURCE")
    sources = list(sources or ([run["data_source"]] if run else ["fortunes", "bible"]))
    names = [_name(s) for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"two sources give the same task name: {sources}")
    out = Path(out_dir).resolve()
    written = []
    for source, name in zip(sources, names):
        docs, where, seed = _documents(source, run, items)
        found = heldout_items(docs, items, seed)
        if len(found) < CHOICES:
            raise ConfigError(f"{source}: only {len(found)} documents of {MIN_CONTEXT_WORDS + 1} words or more in "
                              f"{where}")
        data = atomic_write(out / f"some_{name}.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n"
                                                                for it in found))
        tasks = {}
        for kind in ("lastword", "lastword_choice"):
            task = f"some_{name}_{kind}"
            head = f"# lm-evaluation-harness task written by some ({source}: {where})\n"
            tasks[task] = atomic_write(out / f"{task}.yaml", head + yaml.safe_dump(
                _task(task, data, kind, source, where), sort_keys=False, allow_unicode=True))
        written.append(TaskFiles(source, where, len(found), data, tasks))
    return written


def lm_eval_command(model_dir: PathLike, tasks_dir: PathLike, tasks: str = LM_EVAL_TAG) -> str:
    """The command line that runs the tasks on a model directory."""
    return (f"lm_eval --model hf --model_args pretrained={model_dir},trust_remote_code=True --tasks {tasks} "
            f"--include_path {tasks_dir}")
