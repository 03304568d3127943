"""Measure the context a model really loads at (the loadable maximum).

Every attempt unloads, loads at size N and reads back the context the server
applied: a clamped load is its own outcome, not a pass. Attempts are written
to a journal before they start and after they end, so a killed probe resumes
where it stopped; the model is never left loaded. Results live in a registry
under lmflow's home, keyed by everything that changes the answer.

The working maximum fills the context for real: a pass key at the start, the
middle and the end, temperature 0, the server's own token count checked; a
trial is right when the answer states the key as a whole number ("The pass key
is 65210." is, "165210" is not); bisection on the fill level, the boundary
confirmed with other keys. A probe that finds no working size says so, and
`probed` then refuses its record rather than fall back to the loadable size.

Its text (the verdicts in words, the report for Prefect's UI, the chart) is lmflow.render.probe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import jsonl
from .backends.base import Backend, ModelInfo
from .errors import (
    BackendError,
    BackendTimeout,
    EngineError,
    EngineNotInstalled,
    ProbeMissing,  # noqa: F401 - raised here, defined with the tree
)
from .home import subdir
from .render.probe import chart_svg
from .spec.model import ModelConfig

OK, CLAMPED, LOAD_FAILED, TIMEOUT = "ok", "clamped", "load_failed", "timeout"


@dataclass
class Attempt:
    size: int
    outcome: str
    actual: int | None = None
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ProbeReport:
    key: dict[str, Any]
    declared_max: int | None
    granularity: int
    loadable_max: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    finished: bool = False
    working_max: int | None = None
    trials: list[Any] = field(default_factory=list)

    @property
    def loads(self) -> int:
        return len(self.attempts)


def registry_key(backend: Backend, model: ModelConfig) -> dict[str, Any]:
    """Everything that changes the answer: server, backend, model key and its load options, and the
    server's version and the model's variant where the server tells them."""
    key = {"server": backend.address, "backend": backend.kind, "model": model.key,
           "path": model.path, "gpu": model.gpu, "options": model.options, **backend.fingerprint(model)}
    return json.loads(json.dumps(key, default=str))  # as the registry reads it back (tuples as lists)


def record_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return subdir("probes") / f"{digest}.jsonl"


def _entries(path: Path | None) -> Iterator[dict[str, Any]]:
    """The entries of a probe's journal (none if it has none); a line that cannot be read is
    skipped with a warning naming the file and line (lmflow.jsonl)."""
    if path is not None:
        yield from jsonl.read(path)


def _replay(path: Path) -> dict[int, Attempt]:
    """Attempts that finished in an earlier (maybe killed) run of the same probe."""
    done = {}
    for entry in _entries(path):
        if "outcome" in entry:
            attempt = _parsed(Attempt, {k: entry.get(k) for k in Attempt.__dataclass_fields__})
            if attempt is not None and isinstance(attempt.size, int):
                done[attempt.size] = attempt
    return done


def _parsed(cls: Any, fields: Any) -> Any:
    """`cls(**fields)`, or None when a journal line (edited by hand) does not fit: asked again."""
    try:
        return cls(**fields)
    except TypeError:
        return None


def _append(path: Path, entry: dict[str, Any]) -> None:
    jsonl.append(path, entry)


def probe_loadable(backend: Backend, model: ModelConfig, *, minimum: int = 1024,
                   maximum: int | None = None, granularity: int = 1024,
                   on_attempt: Callable[[Attempt], None] = lambda a: None,
                   fresh: bool = False) -> ProbeReport:
    """Largest context (a multiple of `granularity`) the model loads at without clamping.

    Checks `minimum`, then bisects up to the declared maximum. (Growing
    geometrically first, as first planned, cost up to twice the loads of the
    target ceil(log2(range / granularity)) + 3; see bench/probe.py.)
    """
    declared = maximum
    if declared is None:
        declared = next((m.max_context_length for m in backend.list_models() if m.key == model.key), None)
    if declared is None:
        raise BackendError(f"{backend.url or backend.kind}: no declared maximum context for "
                           f"'{model.key}': give the largest size to try (--max, or max: in the step)",
                           url=backend.url)
    key = registry_key(backend, model)
    path = record_path(key)
    report = ProbeReport(key=key, declared_max=declared, granularity=granularity)
    _release(backend, path)  # before `fresh` forgets what a killed run left loaded
    if fresh:
        path.unlink(missing_ok=True)
    done = _replay(path)
    if not path.exists():
        _append(path, {"probe": key, "declared_max": declared, "granularity": granularity})

    def attempt(size: int) -> bool:
        if size in done:
            result = done[size]
        else:
            _append(path, {"start": size})
            result = _load_once(backend, model, size, path)
            _append(path, asdict(result))
            done[size] = result
        report.attempts.append(result)
        on_attempt(result)
        return result.outcome == OK

    low = max(granularity, minimum - minimum % granularity)
    high = declared - declared % granularity
    if not attempt(low):
        best: int | None = None
    else:
        # bisect on multiples of the granularity between a size that loads and one known not
        # to (just past the declared maximum): at most 1 + ceil(log2(range / granularity + 1))
        # loads, and the largest sizes are only tried once the middle has loaded
        best = _bisect(low, high + granularity, granularity, attempt)
    report.loadable_max = best
    report.finished = True
    _append(path, {"loadable_max": best, "finished": True})
    return report


def _bisect(good: int, bad: int, granularity: int, test: Callable[[int], bool]) -> int:
    """Largest multiple of `granularity` in [good, bad) that passes `test`, given good passes
    and bad does not."""
    while bad - good > granularity:
        middle = (good + bad) // 2
        middle -= middle % granularity
        if middle <= good:
            middle = good + granularity
        if test(middle):
            good = middle
        else:
            bad = middle
    return good


def _load(backend: Backend, model: ModelConfig, journal: Path | None) -> ModelInfo:
    """Load, the instance journaled: a killed probe's next run unloads it (`_release`)."""
    info = backend.load(model)
    if journal is not None and info.instance_id:
        _append(journal, {"instance": info.instance_id})
    return info


def _unload(backend: Backend, model: ModelConfig, journal: Path | None) -> None:
    for instance in backend.unload(model):
        if journal is not None:
            _append(journal, {"instance_unloaded": instance})


def _release(backend: Backend, journal: Path | None) -> None:
    """Unload what a killed earlier run of this probe loaded and could not unload: only instances
    its journal names, never another client's instance of the same model."""
    left: dict[str, None] = {}
    for entry in _entries(journal):
        if isinstance(entry.get("instance"), str):
            left[entry["instance"]] = None
        elif isinstance(entry.get("instance_unloaded"), str):
            left.pop(entry["instance_unloaded"], None)
    for instance in left:
        try:
            backend.unload_instance(instance)
        except BackendError:
            pass  # gone with a restarted server, or the server is down: the next load says so
        _append(journal, {"instance_unloaded": instance})


def _load_once(backend: Backend, model: ModelConfig, size: int, journal: Path) -> Attempt:
    sized = dataclasses.replace(model, context_length=size)
    started = time.monotonic()
    try:
        info = _load(backend, sized, journal)
    except BackendTimeout as exc:
        return Attempt(size, TIMEOUT, seconds=round(time.monotonic() - started, 3), detail=str(exc))
    except EngineNotInstalled:
        raise  # no size will load: say so once, do not record every size as failed
    except (BackendError, EngineError) as exc:  # the managed engine not starting at this size too
        return Attempt(size, LOAD_FAILED, seconds=round(time.monotonic() - started, 3), detail=str(exc))
    finally_seconds = round(time.monotonic() - started, 3)
    try:
        _unload(backend, sized, journal)
    except BackendError:
        pass  # reported by the next attempt's unload if it matters
    actual = info.loaded_context_length
    outcome = OK if actual == size else CLAMPED
    detail = "" if outcome == OK else f"asked {size}, the server applied {actual}"
    return Attempt(size, outcome, actual, finally_seconds, detail)


def registry() -> list[dict[str, Any]]:
    """Every finished probe: its key, loadable maximum and working maximum, and whether the working
    search ran (None with `working_measured` false: never searched; with it true: none found)."""
    results = []
    for path in sorted(subdir("probes").glob("*.jsonl")):
        key, best, finished, working, measured = None, None, False, None, False
        for entry in _entries(path):
            key = entry["probe"] if isinstance(entry.get("probe"), dict) else key
            if entry.get("finished"):
                best, finished = entry.get("loadable_max"), True
            if "working_max" in entry and entry.get("verdict") == VERDICT:
                working, measured = entry["working_max"], True
        if key and finished:
            results.append({**key, "loadable_max": best, "working_max": working,
                            "working_measured": measured})
    return results


# ---------------------------------------------------------------- working maximum

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
QUESTION = "What is the pass key? Answer with the number only."
POSITIONS = ("start", "middle", "end")
ANSWER_RESERVE = 64
#: the rule trials are judged by, written with each judged trial and result in the journal; entries
#: without it were judged by exact match ("The pass key is 65210." was wrong) and are not replayed
VERDICT = 2


@dataclass
class Trial:
    fill: int  # prompt tokens asked for
    position: str
    key: str
    outcome: str  # ok | wrong | truncated | overflow | error
    prompt_tokens: int | None = None
    seconds: float = 0.0
    answer: str = ""  # the model's answer as it came, in full (an error: its message's start)
    first_token_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float | None:
        return round(self.prompt_tokens / self.seconds, 1) if self.prompt_tokens and self.seconds else None


def finds_key(answer: str, key: str) -> bool:
    """Whether the answer states the key as a whole number: "The pass key is 65210." does, "165210" and
    "652101" do not."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None


def _prompt(sentences: int, position: str, key: str) -> str:
    chunks = [FILLER] * sentences
    index = {"start": 0, "middle": sentences // 2, "end": sentences}[position]
    chunks.insert(index, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return ("There is a pass key hidden in the text below. Find it and remember it.\n"
            + "".join(chunks) + "\n" + QUESTION)


def _key(fill: int, position: str, trial: int) -> str:
    digest = hashlib.sha256(f"{fill}:{position}:{trial}".encode()).hexdigest()
    return str(10000 + int(digest[:8], 16) % 90000)


def probe_working(backend: Backend, model: ModelConfig, *, context_length: int, granularity: int = 1024,
                  confirmations: int = 2, journal: Path | None = None,
                  on_trial: Callable[[Trial], None] = lambda t: None) -> tuple[int | None, list[Trial]]:
    """Largest prompt (tokens, a multiple of `granularity`) at which the model retrieves a pass key
    placed at the start, middle and end (stated as a whole number in the answer), at temperature 0;
    None when even the smallest fill fails.

    With a `journal`, each trial is written before it is asked and after it is answered; a re-run
    replays the answered ones and a finished search replays without loading the model at all.
    """
    from .backends.base import ChatRequest

    done, finished = _replay_trials(journal, context_length)
    if finished is not None:
        trials = list(done.values())
        for trial in trials:
            on_trial(trial)
        return finished[0], trials
    loaded = dataclasses.replace(model, context_length=context_length)
    trials: list[Trial] = []

    def ask(sentences: int, position: str, key: str) -> tuple[str, int | None, float, float | None]:
        response = backend.chat(ChatRequest(
            model=loaded, messages=[{"role": "user", "content": _prompt(sentences, position, key)}],
            sampling={"temperature": 0, "seed": 7, "max_tokens": 16}, timeout=600, stream=True))
        return response.text, response.prompt_tokens, response.seconds, response.first_token_seconds

    def count(text: str) -> int | None:
        """The server's own count of a prompt's tokens (None where it cannot count)."""
        try:
            return backend.count_tokens(loaded, text)
        except BackendError:
            return None

    def starting(fill: int, position: str, key: str) -> Trial | None:
        """The answered trial of an earlier run, else None once this one is noted as started."""
        if (fill, position, key) in done:
            return done[(fill, position, key)]
        if journal is not None:
            _append(journal, {"trial_start": {"fill": fill, "position": position, "key": key},
                              "at_context": context_length})
        return None

    def answered(trial: Trial) -> None:
        if journal is not None:
            _append(journal, {"trial": asdict(trial), "at_context": context_length, "verdict": VERDICT})

    _release(backend, journal)  # what a killed earlier run left loaded goes first
    _load(backend, loaded, journal)
    try:
        working, trials = _search_working(backend, ask, count, starting, answered, trials, on_trial,
                                          context_length=context_length, granularity=granularity,
                                          confirmations=confirmations)
    finally:
        try:
            _unload(backend, loaded, journal)
        except BackendError:
            pass
    if journal is not None:
        _append(journal, {"working_max": working, "at_context": context_length, "verdict": VERDICT})
    return working, trials


def _replay_trials(journal: Path | None, context_length: int
                   ) -> tuple[dict[tuple[int, str, str], Trial], tuple[int | None] | None]:
    """Answered trials of an earlier run at this context, and its result if it finished (both only
    when judged by the current rule: an older verdict is asked again)."""
    done: dict[tuple[int, str, str], Trial] = {}
    finished: tuple[int | None] | None = None
    for entry in _entries(journal):
        if entry.get("at_context") != context_length or entry.get("verdict") != VERDICT:
            continue
        if "trial" in entry:
            trial = _parsed(Trial, entry["trial"]) if isinstance(entry["trial"], dict) else None
            if trial is not None:
                done[(trial.fill, trial.position, trial.key)] = trial
        elif "working_max" in entry:
            finished = (entry["working_max"],)
    return done, finished


def _search_working(backend: Backend, ask: Callable[..., tuple[str, int | None, float, float | None]],
                    count: Callable[[str], int | None],
                    starting: Callable[[int, str, str], Trial | None], answered: Callable[[Trial], None],
                    trials: list[Trial],
                    on_trial: Callable[[Trial], None], *, context_length: int,
                    granularity: int, confirmations: int) -> tuple[int | None, list[Trial]]:
    from .errors import ContextOverflow

    # calibrate with the server's own token counts: tokens = base + per_sentence * sentences
    small = ask(4, "end", "11111")[1]
    large = ask(24, "end", "11111")[1]
    if not small or not large:
        raise BackendError(f"{backend.url} reports no prompt token counts: cannot fill the context "
                           "by measure", url=backend.url)
    per_sentence = (large - small) / 20
    base = small - 4 * per_sentence
    # where the server counts tokens (LM Studio), each fill is sized by its count, not by the line
    # through two points: the chat template's share is what the chat counted beyond the text
    counted_small = count(_prompt(4, "end", "11111"))
    template = small - counted_small if counted_small is not None else None

    sized: dict[int, int] = {}

    def sentences_for(fill: int) -> int:
        """Filler sentences for a prompt of `fill` tokens: by the line, or where the server counts,
        the most whose count (plus the template) stays within `fill` (bisection, ~12 counts)."""
        if fill in sized:
            return sized[fill]
        estimate = max(0, int((fill - base) / per_sentence))
        if template is None or count(_prompt(estimate, "end", "11111")) is None:
            sized[fill] = estimate
            return estimate

        def fits(sentences: int) -> bool:
            counted = count(_prompt(sentences, "end", "11111"))
            return counted is not None and counted + template <= fill

        low, high = 0, max(1, estimate)
        while fits(high) and high < 1 << 24:
            low, high = high, high * 2
        while high - low > 1:  # fits(low), not fits(high)
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        sized[fill] = low
        return low

    def run_trial(fill: int, sentences: int, position: str, key: str) -> Trial:
        try:
            text, tokens, seconds, first = ask(sentences, position, key)
        except ContextOverflow:
            return Trial(fill, position, key, "overflow")
        except BackendError as exc:
            return Trial(fill, position, key, "error", answer=str(exc)[:200])
        # the server's count confirms the prompt was not cut before it counted
        truncated = tokens is not None and tokens < 0.9 * fill
        outcome = "truncated" if truncated else ("ok" if finds_key(text, key) else "wrong")
        return Trial(fill, position, key, outcome, tokens, round(seconds, 3), text.strip(),
                     round(first, 3) if first is not None else None)

    def passes(fill: int, trial: int = 0) -> bool:
        sentences = sentences_for(fill)
        ok = True
        for position in POSITIONS:
            key = _key(fill, position, trial)
            result = starting(fill, position, key)
            if result is None:
                result = run_trial(fill, sentences, position, key)
                answered(result)
            trials.append(result)
            on_trial(result)
            ok = ok and result.outcome == "ok"
        return ok

    high = context_length - ANSWER_RESERVE
    high -= high % granularity
    low = granularity
    if not passes(low):
        return None, trials
    best: int = low
    if passes(high):
        best = high
    else:
        best = _bisect(best, high, granularity, passes)
    # confirm the boundary with other keys; step down while it does not hold
    while best > low and not all(passes(best, trial) for trial in range(1, confirmations + 1)):
        best -= granularity
    return best, trials


def record_working(report: ProbeReport, working: int | None, trials: list[Trial]) -> None:
    """Attach the working search (already in the probe's journal) to the report."""
    report.working_max = working
    report.trials = trials


def measure(backend: Backend, model: ModelConfig, *, minimum: int = 1024, maximum: int | None = None,
            granularity: int = 1024, fresh: bool = False, load_only: bool = False,
            on_attempt: Callable[[Attempt], None] = lambda a: None,
            on_trial: Callable[[Trial], None] = lambda t: None) -> ProbeReport:
    """The whole probe, as `lmflow probe` and the `probe_context` step run it: the loadable maximum,
    then (unless `load_only`, and when the model loads at all) the working maximum at that size;
    every attempt and trial journaled, so a killed probe resumes."""
    report = probe_loadable(backend, model, minimum=minimum, maximum=maximum, granularity=granularity,
                            on_attempt=on_attempt, fresh=fresh)
    if report.loadable_max and not load_only:
        working, trials = probe_working(backend, model, context_length=report.loadable_max,
                                        granularity=granularity, on_trial=on_trial,
                                        journal=record_path(report.key))
        record_working(report, working, trials)
    return report


#: "probed" / "probed - 10%": the working maximum; "probed: loadable" / "probed: loadable - 10%":
#: the loadable one (the spec's schema has the same pattern)
PROBED = re.compile(r"probed(?P<loadable>:\s*loadable)?(?:\s*-\s*(?P<margin>[0-9]{1,2})%)?")


def probed_size(backend: Backend, model: ModelConfig) -> int:
    """The registry's working maximum (`probed`) or loadable maximum (`probed: loadable`), less the
    margin (`- 10%`). A record without the size asked for is refused, never substituted."""
    text = str(model.context_length)
    form = PROBED.fullmatch(text.strip())
    if form is None:
        raise ProbeMissing(f"models.{model.alias}: context_length '{text}' is not a number of tokens, "
                           "'probed', 'probed - 10%', 'probed: loadable' or 'probed: loadable - 10%'")
    key = registry_key(backend, dataclasses.replace(model, context_length=None))
    command = f"`lmflow probe {model.key} {backend.probe_command}`"
    entry = next((e for e in reversed(registry()) if all(e.get(k) == v for k, v in key.items())), None)
    if entry is None:
        raise ProbeMissing(
            f"models.{model.alias}: context_length '{text}' needs a probe of '{model.key}' on "
            f"{key['server']}: run {command} or add a probe_context step before it")
    found = f"models.{model.alias}: context_length '{text}': the probe of '{model.key}' on {key['server']}"
    loadable = entry.get("loadable_max")
    if not loadable:
        raise ProbeMissing(f"{found} found no size it loads at: look at its attempts with {command}, "
                           "or give context_length as a number of tokens")
    measured = loadable if form["loadable"] else entry.get("working_max")
    if not measured:
        instead = (f"write context_length: \"probed: loadable\" (or \"probed: loadable - 10%\") to load "
                   f"at the loadable maximum, {loadable}, or give a number of tokens")
        if entry.get("working_measured"):
            raise ProbeMissing(f"{found} found no working maximum: even at the smallest fill the model "
                               f"did not return the pass key at start, middle and end (it loads at most "
                               f"{loadable}); {instead}")
        raise ProbeMissing(f"{found} has no working maximum (it was load-only, or judged answers by an "
                           f"older rule; it loads at most {loadable}): run {command} without --load-only "
                           f"(or the probe_context step without load_only), or {instead}")
    return int(measured * (1 - int(form["margin"] or 0) / 100))


def save_chart(report: ProbeReport) -> Path | None:
    """The chart next to the probe's journal (open it in a browser)."""
    svg = chart_svg(report)
    if svg is None:
        return None
    path = record_path(report.key).with_suffix(".svg")
    path.write_text(svg)
    return path
