"""The ``jaxlab`` command.

    jaxlab list                                     registered experiments and trainers
    jaxlab reproduce [NAME ...] [--quick] [--out DIR] [--seed S] [--jobs N]
                                                    run experiments (all by default) -> DIR/REPORT.md
    jaxlab run NAME [--quick] [--out DIR] [--FIELD VALUE ...]
                                                    one experiment, any config field overridden
    jaxlab train NAME [--out DIR] [--FIELD VALUE ...]
                                                    a registered trainer
    jaxlab launch --nproc N -- COMMAND ...          N processes joined by jax.distributed
    jaxlab generate PATH --prompt TEXT [--max-new-tokens N] [--temperature T] [--chat]
                                                    sample from a Hugging Face checkpoint folder

Arguments are parsed by tyro from the frozen config dataclasses, so ``--help`` documents every
field. Bad input (an unknown name, an invalid value, a config that fails validation) exits with
status 2 and a single ``jaxlab: error: ...`` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar

import tyro

__all__ = ["CLIError", "main"]

T = TypeVar("T")

COMMANDS = {
    "list": "list registered experiments and trainers",
    "reproduce": "run experiments and write figures, JSON and REPORT.md",
    "run": "run one experiment with config overrides",
    "train": "run a registered trainer",
    "launch": "start N processes joined by jax.distributed",
    "generate": "sample a continuation from a Hugging Face checkpoint folder (KV cache)",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class ReproduceArgs:
    """Run experiments (all registered ones by default) and write DIR/<name>.{png,json} and DIR/REPORT.md."""

    names: tyro.conf.Positional[tuple[str, ...]] = ()
    """Experiments to run (default: all; see `jaxlab list`)."""
    quick: bool = False
    """Use each experiment's quick size (the same claims checked at a smaller size; the whole set under 20 minutes
    on 2 CPU cores)."""
    out: pathlib.Path = pathlib.Path("results")
    """Output folder."""
    seed: int = 0
    """Base seed; every experiment derives its keys from it."""
    progress: bool = True
    """Show progress bars."""
    jobs: int | None = None
    """Experiments run at a time, each in its own process (default: one per CPU core, at most 4; 1 on a
    GPU/TPU). Those whose claims compare wall-clock times run alone."""


@dataclasses.dataclass(frozen=True)
class RunArgs(Generic[T]):
    config: Annotated[T, tyro.conf.arg(name="")]
    quick: bool = False
    """Start from the experiment's quick size instead of its full size."""
    out: pathlib.Path = pathlib.Path("results")
    """Output folder."""
    seed: int = 0
    """Base seed."""
    progress: bool = True
    """Show progress bars."""


@dataclasses.dataclass(frozen=True)
class TrainArgs(Generic[T]):
    config: Annotated[T, tyro.conf.arg(name="")]
    out: pathlib.Path = pathlib.Path("runs")
    """Output folder (checkpoints, metrics.jsonl); a run resumes from a checkpoint found there."""


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Sample a continuation of a prompt from a Hugging Face checkpoint folder (Llama, Qwen2, Mistral, GPT-2
    with a tokenizer.json), decoding with the KV cache; prints the generated text."""

    path: tyro.conf.Positional[pathlib.Path]
    """Checkpoint folder: config.json, safetensors weights, tokenizer.json."""
    prompt: str
    """The prompt text."""
    max_new_tokens: int = 64
    """Tokens to generate (the response stops earlier at the tokenizer's EOS)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = None
    """Keep the k most likely tokens (None: all)."""
    top_p: float | None = None
    """Nucleus sampling: keep the most likely tokens up to this probability (None: all)."""
    seed: int = 0
    """Sampling seed."""
    dtype: str | None = None
    """Parameter and compute dtype ("float32", "bfloat16", "float16"; None: the checkpoint's)."""
    chat: bool = False
    """Wrap the prompt as one user message in the checkpoint's chat template."""


_RULE = re.compile(r"[─━═-]{5,}")      # a horizontal rule of the panel (unicode or ASCII)
_EDGE = "│|╭╮╰╯+ \t"


def _one_line(tyro_stderr: str) -> str:
    """Reduce tyro's error panel (unicode or ASCII) to one line: its message and suggestions.

    The panel's sections are separated by rules: the first non-empty section is the message,
    and a section headed "Perhaps you meant:" lists the closest valid options.
    """
    sections: list[list[str]] = [[]]
    for raw in tyro_stderr.splitlines():
        if _RULE.search(raw):
            sections.append([])
            continue
        text = raw.strip(_EDGE)
        if text:
            sections[-1].append(text)
    sections = [s for s in sections if s]
    if len(sections) > 1 and len(sections[0]) == 1 and ":" not in sections[0][0]:
        sections = sections[1:]  # ASCII panels put the title ("Value error") on a line of its own
    if not sections:
        return "invalid arguments"
    line = " ".join(sections[0])
    for section in sections[1:]:
        if section[0].lower().startswith("perhaps you meant"):
            flags = [t.split()[0] for t in section[1:] if t.startswith("--")]
            if flags:
                line += f" (did you mean {', '.join(dict.fromkeys(flags))}?)"
    return line


def _parse(cls: Any, args: Sequence[str], *, default: Any, prog: str, description: str | None = None):
    """``tyro.cli`` with its error panel turned into a ``CLIError`` (help still goes to stdout)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, args=list(args), default=default, prog=prog, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise CLIError(f"{prog}: {_one_line(captured.getvalue())}") from None
    except ValueError as e:  # a config's __post_init__ rejecting the values
        raise CLIError(f"{prog}: invalid config: {e}") from None


def _cmd_list(args: Sequence[str]) -> int:
    from jaxlab import registry

    if args:
        raise CLIError(f"jaxlab list takes no arguments, got {' '.join(args)!r}")
    table = registry.experiments()
    width = max((len(n) for n in table), default=10)
    print(f"Experiments ({len(table)}), run with `jaxlab reproduce [NAME ...] [--quick]`:")
    for name, exp in table.items():
        print(f"  {name:<{width}}  {exp.description}\n  {'':<{width}}  reproduces: {exp.paper}")
    trainers = registry.trainers()
    if trainers:
        print(f"\nTrainers ({len(trainers)}), run with `jaxlab train NAME --help`:")
        width = max(len(n) for n in trainers)
        for name, tr in trainers.items():
            print(f"  {name:<{width}}  {tr.description}")
    return 0



def _cmd_reproduce(args: Sequence[str]) -> int:
    from jaxlab import registry
    from jaxlab.reproduce import claims_tally, default_jobs, reproduce

    opts = _parse(ReproduceArgs, args, default=ReproduceArgs(), prog="jaxlab reproduce")
    experiments = [registry.get_experiment(name) for name in opts.names] or list(registry.experiments().values())
    if not experiments:
        raise CLIError("no experiments are registered")
    runs = [(e, e.default_config(opts.quick)) for e in experiments]
    if opts.jobs is not None and opts.jobs < 1:
        raise CLIError(f"jaxlab reproduce: --jobs {opts.jobs} must be >= 1")
    jobs = opts.jobs if opts.jobs is not None else default_jobs()
    records, report = reproduce(runs, opts.out, quick=opts.quick, seed=opts.seed, show_progress=opts.progress,
                                jobs=jobs)
    failed = [r.name for r in records if r.error is not None]
    print(f"wrote {report} ({len(records) - len(failed)} ok, {len(failed)} failed). {claims_tally(records)}")
    if failed:
        print(f"jaxlab: error: failed experiments: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _split_name(command: str, args: Sequence[str], known: Sequence[str]) -> tuple[str, list[str]]:
    if not args or args[0].startswith("-"):
        if args and args[0] in ("-h", "--help"):
            print(f"usage: jaxlab {command} NAME [--help] [--FIELD VALUE ...]\n\nNAME is one of: "
                  + ", ".join(known))
            raise SystemExit(0)
        raise CLIError(f"jaxlab {command} needs a NAME (one of: {', '.join(known) or 'none registered'})")
    return args[0], list(args[1:])


def _cmd_run(args: Sequence[str]) -> int:
    from jaxlab import registry
    from jaxlab.reproduce import reproduce

    name, rest = _split_name("run", args, registry.experiment_names())
    experiment = registry.get_experiment(name)
    quick = "--quick" in rest
    cls = RunArgs[experiment.config_cls]
    opts = _parse(cls, rest, default=RunArgs(config=experiment.default_config(quick), quick=quick),
                  prog=f"jaxlab run {name}", description=f"{experiment.description} ({experiment.paper})")
    records, report = reproduce([(experiment, opts.config)], opts.out, quick=opts.quick, seed=opts.seed,
                                show_progress=opts.progress)
    if records[0].error is not None:
        print(f"jaxlab: error: {name} failed: {records[0].error}", file=sys.stderr)
        return 1
    print(f"wrote {opts.out / (name + '.png')}, {opts.out / (name + '.json')} and {report}")
    return 0


def _cmd_train(args: Sequence[str]) -> int:
    from jaxlab import registry

    name, rest = _split_name("train", args, registry.trainer_names())
    trainer = registry.get_trainer(name)
    opts = _parse(TrainArgs[trainer.config_cls], rest, default=TrainArgs(config=trainer.config_cls()),
                  prog=f"jaxlab train {name}", description=trainer.description)
    trainer.fn(opts.config, opts.out)
    return 0


def _cmd_generate(args: Sequence[str]) -> int:
    opts = _parse(GenerateArgs, args, default=None, prog="jaxlab generate")
    import jax
    import jax.numpy as jnp

    from jaxlab.models.hub import load_pretrained
    from jaxlab.models.sampling import sample

    try:
        model, params, tokenizer = load_pretrained(opts.path, dtype=opts.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"jaxlab generate: {e}") from None
    if tokenizer is None:
        raise CLIError(f"jaxlab generate: {opts.path} has no tokenizer.json")
    try:
        if opts.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": opts.prompt}])
            prompt = tokenizer.encode(text, add_special_tokens=False)
        else:
            prompt = tokenizer.encode(opts.prompt)
        if prompt.size == 0:
            raise ValueError(f"prompt={opts.prompt!r} encodes to no tokens")
        eos = tokenizer.eos_id
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (eos or 0)
        out = sample(model, params, jnp.asarray(prompt[None], jnp.int32), jax.random.key(opts.seed),
                     opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                     eos_id=eos, pad_id=pad)
    except ValueError as e:
        raise CLIError(f"jaxlab generate: {e}") from None
    response = [int(t) for t, keep in zip(out.response[0], out.mask[0]) if keep and int(t) != eos]
    print(tokenizer.decode(response, skip_special_tokens=True))
    return 0


def _cmd_launch(args: Sequence[str]) -> int:
    try:
        from jaxlab.parallel.launch import main as launch_main
    except ImportError as e:
        raise CLIError(f"jaxlab launch is unavailable: {e}") from None
    return launch_main(list(args))


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return f"usage: jaxlab COMMAND [ARGS ...]\n\ncommands:\n{rows}\n\n`jaxlab COMMAND --help` for details."


_RUN_FAILURES = ("NonFiniteError", "CheckpointError", "CorruptCheckpointError")


def _is_run_failure(e: BaseException) -> bool:
    """A run that stopped for a reason its message explains in full (a non-finite loss, an unusable
    checkpoint, an unwritable output folder): reported in one line, exit status 1, no traceback.
    (Matched by name so the CLI does not import JAX to define its error handling.)"""
    if isinstance(e, OSError) and "output folder" in str(e):
        return True
    return any(c.__name__ in _RUN_FAILURES and c.__module__.startswith("jaxlab.") for c in type(e).__mro__)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxlab import __version__
    from jaxlab.process_setup import setup_process
    from jaxlab.registry import RegistryError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"jaxlab {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    handlers = {"list": _cmd_list, "reproduce": _cmd_reproduce, "run": _cmd_run, "train": _cmd_train,
                "launch": _cmd_launch, "generate": _cmd_generate}
    try:
        if command not in handlers:
            close = difflib.get_close_matches(command, list(handlers), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CLIError(f"unknown command {command!r}{hint} (commands: {', '.join(handlers)})")
        if command in ("reproduce", "run", "train", "generate"):
            setup_process()  # dispatch mode and host memory, as reproduce's child processes do
            # Under `jaxlab launch` this joins the multi-process job before JAX sees devices;
            # on its own it does nothing.
            from jaxlab.parallel.launch import maybe_initialize_distributed
            try:
                maybe_initialize_distributed()
            except ValueError as e:
                raise CLIError(str(e)) from None
        return handlers[command](rest)
    except (CLIError, RegistryError) as e:
        print(f"jaxlab: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _is_run_failure(e):
            raise
        print(f"jaxlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
