"""lm-eval task YAMLs over local JSON data, read as they are by flopwise's own engine.

The subset read is what a local task needs, with lm-eval's meaning (``ConfigurableTask``, zero-shot):

    task: my_task
    dataset_path: json
    dataset_kwargs:
      data_files: {test: my_tasks/my_task.jsonl}   # or a path, or a list of paths (the split "train")
    test_split: test                                # else validation_split
    output_type: multiple_choice                    # or generate_until
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"                    # a field, a template giving a list, or a list
    doc_to_target: answer                           # the right choice's index or text; for generate_until the text
    target_delimiter: " "                           # put between the context and each choice (default " ")
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32}

Each ``doc_to_*`` is a field of the record when one has that name, else a Jinja template rendered as lm-eval
renders it (strict about undefined names, trailing newline kept, its ``regex_replace`` filter), or for
``doc_to_choice`` a YAML list.  The data is JSON Lines or one JSON list of objects.  Relative ``data_files``
are taken from the current directory (or ``dataset_kwargs.data_dir``), as lm-eval, through
``datasets.load_dataset``, takes them; ``include`` is merged as lm-eval merges it (relative to the YAML).

Multiple choice becomes a flopwise "choice" task: the context is ``doc_to_text``, the choices are
``target_delimiter + choice`` (exactly the continuations lm-eval scores); generate_until becomes a "generate"
task with the YAML's ``until`` (lm-eval's default: ``fewshot_delimiter``) and ``max_gen_toks`` (default 256).
Anything else that would change what is scored (``process_docs``, ``!function``, ``filter_list``, few-shot
examples, ``description``, another dataset or output type...) is refused in one line naming the file and the
field: such a task runs as it is in lm-eval, with flopwise's model through the adapter.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, NoReturn

import yaml

from flopwise.data.sources import jsonl_lines
from flopwise.errors import FlopwiseError
from flopwise.evaluate.tasks.spec import Example, Task, check_examples

KINDS = {"multiple_choice": "choice", "generate_until": "generate"}
LM_EVAL_MAX_GEN_TOKS = 256  # lm-eval's default for a generate_until task
# fields read here, and fields that do not change what a zero-shot task scores (names, bookkeeping)
READ = {"task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "output_type", "doc_to_text",
        "doc_to_target", "doc_to_choice", "target_delimiter", "generation_kwargs", "num_fewshot", "metric_list",
        "repeats", "include"}
HARMLESS = {"task_alias", "tag", "training_split", "fewshot_split", "fewshot_delimiter", "fewshot_config", "metadata",
            "should_decontaminate", "doc_to_decontamination_query", "unsafe_code", "dataset_name"}
_METRICS = {"choice": {"acc", "acc_norm", "acc_bytes"}, "generate": {"exact_match"}}
_GREEDY_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}


class _Function:
    """A ``!function`` value: code lm-eval would import and run, which flopwise does not."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(str(loader.construct_scalar(node))))


def read_lm_eval_task(path: Path) -> Task:
    """The task one lm-eval YAML describes, its examples read from its local JSON data."""
    config = _load_yaml(path, set())
    reader = _Reader(path, config)
    return reader.task()


def read_lm_eval_folder(folder: Path) -> list[Task]:
    """Every task in a folder of lm-eval YAMLs (searched as ``--include_path`` is), by file name; YAMLs that
    name no ``task`` (templates other YAMLs ``include``) are skipped."""
    tasks = []
    for path in sorted(p for p in folder.rglob("*.yaml") if p.is_file()):  # as lm-eval searches a folder
        if "task" in _load_yaml(path, set()):
            tasks.append(read_lm_eval_task(path))
    if not tasks:
        raise FlopwiseError(f"'{folder}' holds no lm-eval task YAML (one with a 'task' field)")
    return tasks


def _load_yaml(path: Path, seen: set[Path]) -> dict[str, Any]:
    """The YAML's fields with its ``include`` merged in first (its own fields win), as lm-eval loads it."""
    resolved = path.expanduser().resolve()
    if resolved in seen:
        raise FlopwiseError(f"task file '{path}' includes itself (through 'include'): break the cycle")
    try:
        config = yaml.load(resolved.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader
    except (OSError, UnicodeDecodeError) as err:
        raise FlopwiseError(f"task file '{path}' cannot be read ({err}): give a UTF-8 lm-eval task YAML") from None
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise FlopwiseError(f"task file '{path}' is not valid YAML ({problem})") from None
    if not isinstance(config, dict):
        raise FlopwiseError(f"task file '{path}' is not a YAML mapping of lm-eval task fields")
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        if not isinstance(include, str):
            raise FlopwiseError(f"task file '{path}' field 'include' must name a YAML file (or a list of them)")
        included = Path(include) if Path(include).is_absolute() else resolved.parent / include
        if not included.is_file():
            raise FlopwiseError(f"task file '{path}' field 'include': '{included}' is not a file")
        merged.update(_load_yaml(included, seen | {resolved}))
    merged.pop("task_list", None)
    return {**merged, **config}


class _Reader:
    """One YAML's fields checked and applied to its records."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path, self.config = path, config
        self.check_fields()
        self.name = config["task"]
        self.kind = KINDS[config["output_type"]]
        self.delimiter = config.get("target_delimiter", " ")
        if not isinstance(self.delimiter, str):
            self.refuse("target_delimiter", "must be a string, e.g. \" \"")

    def refuse(self, field: str, why: str) -> NoReturn:
        raise FlopwiseError(f"task file '{self.path}' field '{field}' {why}")

    def unsupported(self, field: str, why: str) -> NoReturn:
        self.refuse(field, f"{why}, which flopwise's task reader does not support: run this task with lm-eval "
                           f"and flopwise's model instead (python -m flopwise.lm_eval --model flopwise "
                           f"--model_args run=RUN --tasks {self.config.get('task', 'NAME')} --include_path "
                           f"{self.path.parent})")

    def check_fields(self) -> None:
        config = self.config
        for field, value in config.items():
            if _holds_function(value):
                self.unsupported(field, "runs Python code (!function)")
        for field, value in config.items():
            if field not in READ | HARMLESS and value not in (None, "") and value != []:  # lm-eval's "unset"
                self.unsupported(field, "changes how lm-eval builds or scores the task")
        if not isinstance(config.get("task"), str) or not config["task"]:
            self.refuse("task", "must be the task's name (a string): every lm-eval task YAML names its task")
        if config.get("dataset_path") != "json":
            self.unsupported("dataset_path", f"is {config.get('dataset_path')!r}, not json (local JSON data)")
        if config.get("dataset_name") is not None:
            self.unsupported("dataset_name", "names a dataset configuration")
        output_type = config.get("output_type", "generate_until")  # lm-eval's default
        if output_type not in KINDS:
            self.unsupported("output_type", f"is {output_type!r} (multiple_choice and generate_until are read)")
        config["output_type"] = output_type
        if config.get("num_fewshot") not in (None, 0):
            self.unsupported("num_fewshot", f"is {config['num_fewshot']!r} (few-shot examples)")
        if config.get("repeats", 1) != 1:
            self.unsupported("repeats", f"is {config['repeats']!r}")
        for entry in config.get("metric_list") or []:
            if not (isinstance(entry, dict) and isinstance(entry.get("metric"), str)
                    and entry["metric"] in _METRICS[KINDS[output_type]]
                    and entry.get("aggregation", "mean") == "mean" and entry.get("higher_is_better", True) is True
                    and set(entry) <= {"metric", "aggregation", "higher_is_better"}):
                self.unsupported("metric_list", f"has {entry!r} (flopwise reports "
                                                f"{', '.join(sorted(_METRICS[KINDS[output_type]]))} as they are)")
        for field in ("doc_to_text", "doc_to_target") + (("doc_to_choice",) if output_type == "multiple_choice"
                                                          else ()):
            if config.get(field) is None:
                self.refuse(field, f"is missing: a {output_type} task needs doc_to_text, doc_to_target"
                                   + (" and doc_to_choice" if output_type == "multiple_choice" else ""))
        if output_type == "generate_until" and config.get("doc_to_choice") is not None:
            self.unsupported("doc_to_choice", "is set on a generate_until task (its target then picks a choice)")

    # ------------------------------------------------------------------ data

    def task(self) -> Task:
        records = self.records()
        features = {key for _, record in records for key in record}
        examples = []
        for where, record in records:
            doc = _Doc(record, features, f"{self.data_name} {where}", self)
            examples.append(self.choice(doc) if self.kind == "choice" else self.generation(doc))
        max_new_tokens = LM_EVAL_MAX_GEN_TOKS
        if self.kind == "generate":
            max_new_tokens = self.generation_kwargs()[1]
        return check_examples(Task(self.name, self.kind, tuple(examples), str(self.path), max_new_tokens))

    def split_file(self) -> Path:
        """The data file of the split lm-eval evaluates (test_split, else validation_split)."""
        kwargs = self.config.get("dataset_kwargs") or {}
        if not isinstance(kwargs, dict) or "data_files" not in kwargs:
            self.refuse("dataset_kwargs", "must give data_files, the local JSON or JSON Lines file(s)")
        extra = sorted(set(kwargs) - {"data_files", "data_dir"})
        if extra:
            self.unsupported(f"dataset_kwargs.{extra[0]}", "is a dataset loading option")
        split = self.config.get("test_split") or self.config.get("validation_split")
        if not split:
            self.refuse("test_split", "is missing (and so is validation_split): name the split to evaluate")
        files = kwargs["data_files"]
        files = files if isinstance(files, dict) else {"train": files}  # as datasets names a split not named
        if split not in files:
            self.refuse("dataset_kwargs.data_files", f"has no split '{split}' (it has {', '.join(map(str, files))})")
        chosen = files[split]
        if isinstance(chosen, list) and len(chosen) == 1:
            chosen = chosen[0]
        if not isinstance(chosen, str):
            self.unsupported("dataset_kwargs.data_files", f"gives split '{split}' {chosen!r}, not one file")
        if any(char in chosen for char in "*?["):
            self.unsupported("dataset_kwargs.data_files", f"gives a pattern '{chosen}' (name the file)")
        base = Path(kwargs.get("data_dir") or ".").expanduser()
        path = Path(chosen).expanduser()
        return path if path.is_absolute() else base / path

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, record) for each record of JSON Lines or of one JSON list."""
        path = self.split_file()
        self.data_name = f"data file '{path}'"
        if not path.is_file():
            self.refuse("dataset_kwargs.data_files", f"names '{path}', which is not a file (relative paths are "
                                                     "taken from the current directory, as lm-eval takes them)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise FlopwiseError(f"{self.data_name} cannot be read ({err}): give UTF-8 JSON Lines") from None
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            found = [(f"record {index + 1}", record) for index, record in enumerate(whole)]
        elif isinstance(whole, dict):
            found = [("line 1", whole)]
        else:
            found = []
            for number, line in jsonl_lines(text):
                try:
                    found.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise FlopwiseError(f"{self.data_name} line {number} is not JSON ({err.msg}): write JSON Lines "
                                        "(one object per line) or one JSON list of objects") from None
        for where, record in found:
            if not isinstance(record, dict):
                raise FlopwiseError(f"{self.data_name} {where} is not a JSON object")
        return found

    # ------------------------------------------------------------------ examples

    def choice(self, doc: _Doc) -> Example:
        context = doc.text("doc_to_text")
        choices = doc.choices()
        target = doc.value("doc_to_target", digits_to_int=True)
        if isinstance(target, str) and target in choices:
            answer = choices.index(target)
        elif isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
            answer = target
        else:
            doc.fail("doc_to_target", f"gives {target!r}, which is neither a choice nor a choice's index "
                                      f"(0 to {len(choices) - 1})")
        return Example(context, tuple(choices), answer, delimiter=self.delimiter)

    def generation(self, doc: _Doc) -> Example:
        target = doc.value("doc_to_target", digits_to_int=False)
        if isinstance(target, (list, dict)):
            doc.unsupported("doc_to_target", "gives several targets")
        target = str(target)
        if not target.strip():
            doc.fail("doc_to_target", "gives an empty target")
        return Example(doc.text("doc_to_text"), target=target, until=tuple(self.generation_kwargs()[0]))

    def generation_kwargs(self) -> tuple[list[str], int]:
        kwargs = self.config.get("generation_kwargs")
        if kwargs is None:  # lm-eval's defaults for a generate_until task
            return [self.config.get("fewshot_delimiter", "\n\n")], LM_EVAL_MAX_GEN_TOKS
        if not isinstance(kwargs, dict):
            self.refuse("generation_kwargs", "must be a mapping, e.g. {until: [\"\\n\"]}")
        extra = sorted(set(kwargs) - _GREEDY_KWARGS)
        if extra:
            self.unsupported(f"generation_kwargs.{extra[0]}", "is a generation setting other than until, "
                                                              "max_gen_toks and greedy decoding")
        if kwargs.get("do_sample") or (kwargs.get("do_sample") is None and float(kwargs.get("temperature") or 0) > 0):
            self.unsupported("generation_kwargs", "samples (do_sample or a temperature above 0)")
        until = kwargs.get("until", [self.config.get("fewshot_delimiter", "\n\n")])
        until = [until] if isinstance(until, str) else until
        if not (isinstance(until, list) and all(isinstance(stop, str) for stop in until)):
            self.refuse("generation_kwargs.until", "must be a string or a list of strings, e.g. [\"\\n\"]")
        max_gen_toks = kwargs.get("max_gen_toks", LM_EVAL_MAX_GEN_TOKS)
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            self.refuse("generation_kwargs.max_gen_toks", f"is {max_gen_toks!r}, not a positive number of tokens")
        return [stop for stop in until if stop], max_gen_toks


class _Doc:
    """One record, with the ``doc_to_*`` fields applied to it as lm-eval applies them."""

    def __init__(self, record: dict[str, Any], features: set[str], where: str, reader: _Reader) -> None:
        self.record, self.features, self.where, self.reader = record, features, where, reader

    def fail(self, field: str, why: str) -> NoReturn:
        raise FlopwiseError(f"{self.where}: {field} of task file '{self.reader.path}' {why}")

    def unsupported(self, field: str, why: str) -> NoReturn:
        self.reader.unsupported(field, why)

    def lookup(self, field: str, spec: str) -> Any:
        """The record's field named ``spec`` (one some record has)."""
        if spec not in self.record:
            self.fail(field, f"names the field '{spec}', which this record does not have")
        return self.record[spec]

    def render(self, field: str, template: str) -> str:
        import jinja2

        try:
            return _jinja().from_string(template).render(**self.record)
        except jinja2.TemplateError as err:
            self.fail(field, f"cannot be rendered ({type(err).__name__}: {str(err).splitlines()[0]})")

    def text(self, field: str) -> str:
        """doc_to_text: a string (an index into the choices, lm-eval's multiple-input form, is refused)."""
        spec = self.reader.config[field]
        if isinstance(spec, str):
            if spec in self.features:
                value = self.lookup(field, spec)
            else:  # all digits: lm-eval takes it for an index into the choices (on a task with choices)
                value = self.render(field, spec)
                value = _number(value) if self.reader.kind == "choice" else value
        else:
            value = spec
        if not isinstance(value, str):
            self.unsupported(field, f"gives {value!r}, not text (lm-eval's multiple-input form)")
        return value

    def value(self, field: str, digits_to_int: bool) -> Any:
        """doc_to_target as lm-eval reads it: a YAML value, a field, or a template's text (a number when it is
        all digits on a task with choices; a list when it reads as one)."""
        spec = self.reader.config[field]
        if not isinstance(spec, str):
            if isinstance(spec, list):
                self.unsupported(field, "gives several targets")
            return spec
        if spec in self.features:
            value = self.lookup(field, spec)
            if isinstance(value, list):
                self.unsupported(field, "gives several targets")
            return value
        text = self.render(field, spec)
        if digits_to_int and isinstance(_number(text), int):
            return _number(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
            self.unsupported(field, "gives several targets")
        return text

    def choices(self) -> list[str]:
        spec = self.reader.config["doc_to_choice"]
        if isinstance(spec, str):
            if spec in self.features:
                choices = self.lookup("doc_to_choice", spec)
            else:
                text = self.render("doc_to_choice", spec)
                try:
                    choices = ast.literal_eval(text)
                except (SyntaxError, ValueError):
                    self.fail("doc_to_choice", f"renders to {text!r}, not a list literal such as ['a', 'b']")
        elif isinstance(spec, dict):
            choices = list(spec.values())
        else:
            choices = spec
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            self.fail("doc_to_choice", f"gives {choices!r}: a list of two or more strings is needed")
        if not self.reader.delimiter and not all(choices):
            self.fail("doc_to_choice", "gives an empty choice, and target_delimiter is empty: nothing to score")
        return choices


def _number(text: str) -> str | int:
    """A rendered text that is all digits as lm-eval reads it on a task with choices: a number."""
    try:
        return int(text) if text.isdigit() else text
    except ValueError:  # digits that are not 0-9 (superscripts...)
        return text


def _holds_function(value: Any) -> bool:
    if isinstance(value, _Function):
        return True
    if isinstance(value, dict):
        return any(_holds_function(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_function(v) for v in value)
    return False


_ENVIRONMENT = None


def _jinja() -> Any:
    """lm-eval's Jinja environment (lm_eval/utils.py): undefined names are errors, a trailing newline is kept,
    and its ``regex_replace`` filter."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import jinja2

        _ENVIRONMENT = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined,
                                          keep_trailing_newline=True)
        _ENVIRONMENT.filters["regex_replace"] = lambda string, pattern, repl, count=0: re.sub(pattern, repl, string,
                                                                                             count=count)
    return _ENVIRONMENT
