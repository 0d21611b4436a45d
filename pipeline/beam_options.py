"""Strict options: an option of `prep run` that is not prep's must be a Beam pipeline option.

`prep run` passes the options it does not know to Beam. Beam itself ignores (and only logs)
options that no `PipelineOptions` class declares, so a typo such as `--samples-per-shards 4`
would silently run with the default. Here the given Beam options are parsed with the parser
Beam builds from every `PipelineOptions` subclass the installed Beam defines (what
`PipelineOptions.get_all_options` does); anything left over is an error naming the closest
prep option (and the closest Beam option when that is closer).

The Beam options as given are recorded in the manifest ("beam_options"), with the values of
options that carry credentials (`--s3_secret_access_key`, ...) replaced by "<redacted>".
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from typing import Iterable, Optional, Sequence

REDACTED = "<redacted>"
_SECRET = re.compile(r"secret|password|passwd|token|credential|access_key|key_id|connection_string|api_key", re.I)
_CUTOFF = 0.6  # difflib's default: below this a "did you mean" misleads more than it helps


class UnknownOptions(ValueError):
    """Options that neither prep nor the installed Beam knows (or Beam options with bad values)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we report
        raise UnknownOptions(f"Beam option: {message}")


def _option_classes() -> list[type]:
    from apache_beam.options.pipeline_options import PipelineOptions

    seen: dict[str, type] = {}
    todo = list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop(0)
        seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        todo.extend(cls.__subclasses__())
    return list(seen.values())


def beam_parser() -> argparse.ArgumentParser:
    """The parser of every pipeline option the installed Beam declares."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    class Parser(_Parser, _BeamArgumentParser):
        pass

    parser = Parser(allow_abbrev=False, add_help=False)
    for cls in _option_classes():
        try:
            cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own way to list its options
        except argparse.ArgumentError:
            continue  # an options class that repeats another's option (Beam tolerates this too)
    return parser


def beam_option_names(parser: Optional[argparse.ArgumentParser] = None) -> list[str]:
    parser = parser or beam_parser()
    return sorted({s for action in parser._actions for s in action.option_strings})  # noqa: SLF001


def prep_option_names() -> list[str]:
    """`prep run`'s options as RunConfig declares them (the CLI adds its own few)."""
    from prep.pipeline.config import RunConfig

    names = []
    for f in dataclasses.fields(RunConfig):
        flags = [s for s in f.metadata.get("flags", ()) if s.startswith("--")] or [f"--{f.name.replace('_', '-')}"]
        names.extend(flags)
        if f.type in (bool, "bool"):
            names.append(f"--no-{f.name.replace('_', '-')}")
    return names


def _norm(name: str) -> str:
    return name.lstrip("-").lower().replace("_", "-")


def _closest(name: str, candidates: Iterable[str]) -> tuple[Optional[str], float]:
    best, score = None, 0.0
    for candidate in candidates:
        ratio = difflib.SequenceMatcher(None, _norm(name), _norm(candidate)).ratio()
        if ratio > score:
            best, score = candidate, ratio
    return (best, score) if score >= _CUTOFF else (None, score)


def suggestion(name: str, prep_options: Sequence[str], beam_options: Sequence[str]) -> str:
    """' (did you mean --samples-per-shard?)', naming the Beam option too when it is closer."""
    prep, prep_score = _closest(name, prep_options)
    beam, beam_score = _closest(name, beam_options)
    if beam and (not prep or beam_score > prep_score):
        also = f", or prep's {prep}" if prep else ""
        return f" (did you mean the Beam option {beam}{also}?)"
    return f" (did you mean {prep}?)" if prep else ""


def unknown_options(args: Sequence[str], prep_options: Optional[Sequence[str]] = None) -> list[str]:
    """One sentence per option in `args` that the installed Beam does not declare.

    Both `--opt=value` and `--opt value` are accepted, and Beam's boolean flags take no
    value. A value that Beam's parser rejects (`--direct_num_workers=two`) raises
    UnknownOptions at once, with Beam's own message.
    """
    parser = beam_parser()
    _, rest = parser.parse_known_args(list(args))
    prep_options = list(prep_options) if prep_options is not None else prep_option_names()
    beam_options = beam_option_names(parser)
    problems, i = [], 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if "=" not in token and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
                i += 1  # its value
            problems.append(f"unknown option {name}: neither a prep option nor a Beam pipeline option"
                            f"{suggestion(name, prep_options, beam_options)}")
        else:
            problems.append(f"unexpected argument {token!r} (prep run takes options only)")
        i += 1
    return problems


# The runners prep runs. No --runner: Beam's in-memory FnApiRunner, prep's local runner
# (pipeline/local.py, --workers N). Others are refused before anything starts.
SUPPORTED_RUNNERS = ("DirectRunner", "DataflowRunner")
_RUNNER_REASONS = {
    "dask": "Beam's DaskRunner (2.77) mixes a step's tagged outputs, drops what finish_bundle emits, runs only one "
            "leaf of the graph and has no metrics, all silently (reproduced without prep: python -m bench.dask_repro; "
            "docs/scale.md)",
    "prism": "the Prism runner downloads a binary at start; no --runner runs the same pipeline locally",
}
_BEAM_RUNNERS = ("bundlebaseddirect", "switchingdirect", "interactive", "flink", "fnapi", "kafkastreams", "portable",
                 "prism", "spark", "testdirect", "testdataflow", "dask")


def _runner_key(name: str) -> str:
    key = name.rsplit(".", 1)[-1].lower()
    return key[: -len("runner")] if key.endswith("runner") and key != "runner" else key


def runner_problem(name: Optional[str]) -> Optional[str]:
    """One sentence when `name` (a --runner value) is not a runner prep runs, else None."""
    if not name:
        return None
    key = _runner_key(name)
    if key in {_runner_key(r) for r in SUPPORTED_RUNNERS}:
        return None
    supported = "no --runner (local; --workers N), " + " or ".join(f"--runner={r}" for r in SUPPORTED_RUNNERS)
    if key in _RUNNER_REASONS:
        why = _RUNNER_REASONS[key]
    elif key in _BEAM_RUNNERS:
        why = "a Beam runner prep does not support (its pipeline is not tested there)"
    else:
        why = "not a runner Beam knows"
    return f"--runner={name}: {why}; prep runs with {supported}"


def runner_problems(args: Sequence[str]) -> list[str]:
    """runner_problem for every --runner in `args` (`--runner=X` or `--runner X`)."""
    found, args = [], list(args)
    for i, arg in enumerate(args):
        if arg == "--runner" and i + 1 < len(args):
            found.append(runner_problem(args[i + 1]))
        elif arg.startswith("--runner="):
            found.append(runner_problem(arg.split("=", 1)[1]))
    return [f for f in found if f]


def check_beam_args(args: Sequence[str], prep_options: Optional[Sequence[str]] = None) -> None:
    """Raise UnknownOptions listing every option in `args` that is neither prep's nor Beam's."""
    problems = unknown_options(args, prep_options)
    if problems:
        raise UnknownOptions("\n".join(problems))


def recorded(args: Sequence[str]) -> list[str]:
    """The Beam options as given, for the manifest; credentials' values are redacted."""
    args = list(args)
    parser = beam_parser()
    flags = {s for a in parser._actions if a.nargs == 0 for s in a.option_strings}  # noqa: SLF001
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        secret = arg.startswith("--") and bool(_SECRET.search(name))
        if "=" in arg:
            out.append(f"{name}={REDACTED}" if secret else arg)
        elif arg.startswith("--") and name not in flags and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.extend([arg, REDACTED if secret else args[i + 1]])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out
