"""Playbooks: YAML text in, validated `Trigger` objects out.

Parsing works on the YAML node tree so that every problem names its file and line. All problems
in a set of files are collected and raised together as one `PlaybookError`. This module reads no
files: callers hand it `(name, text)` pairs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from forewarn import detect, expr
from forewarn.errors import PlaybookError, Problem

SCOPES = ("user", "account")
CHANNELS = ("email", "in_app", "push", "webhook", "chat")
MODES = ("live", "shadow")
COMPARATORS = (">=", ">", "<=", "<", "==")
UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^([0-9]+)([smhdw])$")
_TRIGGER_ID = re.compile(r"^[a-z0-9-]+$")

Scalar = str | int | float | bool


# --- the language, as data -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Where:
    """Property equality, as JSON sees it (true is not 1); a tuple of values means any of them."""

    pairs: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    def matches(self, properties: dict[str, Any]) -> bool:
        return all(one_of(properties.get(key), allowed) for key, allowed in self.pairs)

    def matcher(self) -> Callable[[dict[str, Any]], bool] | None:
        """`matches`, or None when there is nothing to check. The usual `where`, one property
        and text values, becomes a plain lookup: only a string equals a string, so the rule
        that true is not 1 cannot come into it."""
        if not self.pairs:
            return None
        if len(self.pairs) == 1 and all(type(value) is str for value in self.pairs[0][1]):
            key, allowed = self.pairs[0]
            return lambda properties: properties.get(key) in allowed
        return self.matches


TraitRef = tuple[str, tuple[str, ...]]  # ("traits" | "account", path)


def ref_name(ref: TraitRef) -> str:
    """A trait reference as written in a playbook: `traits.created_at`."""
    return ref[0] + "." + ".".join(ref[1])


def one_of(value: Any, allowed: tuple[Scalar, ...]) -> bool:
    """`value in allowed`, as JSON sees equality: true is not 1 and false is not 0."""
    if value not in allowed:
        return False
    if value is True or value is False or True in allowed or False in allowed:
        is_bool = value is True or value is False
        return any(value == a and is_bool == (a is True or a is False) for a in allowed)
    return True


@dataclass(frozen=True, slots=True)
class EventCond:
    name: str
    where: Where
    count: int
    within_ms: int | None


@dataclass(frozen=True, slots=True)
class SpikeCond:
    name: str
    where: Where
    window_ms: int
    factor: float
    baseline_ms: int
    min_count: int


@dataclass(frozen=True, slots=True)
class DropCond:
    name: str
    where: Where
    window_ms: int
    below: float
    baseline_ms: int


@dataclass(frozen=True, slots=True)
class AbsentCond:
    name: str
    where: Where
    for_ms: int


@dataclass(frozen=True, slots=True)
class AnomalyCond:
    name: str
    where: Where
    value: expr.Expression | None  # of the event's properties; None: count the events
    window_ms: int
    direction: str  # up | down | both
    sensitivity: str  # low | medium | high


@dataclass(frozen=True, slots=True)
class OverdueCond:
    name: str
    where: Where
    factor: float
    min_events: int
    lapse: float | None = None  # judge by the probability of having stopped instead of factor


@dataclass(frozen=True, slots=True)
class ThresholdCond:
    value: expr.Expression
    op: str
    target: float


@dataclass(frozen=True, slots=True)
class DwellCond:
    page: str
    for_ms: int
    unless: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DateCond:
    trait: tuple[str, tuple[str, ...]]
    within_ms: int


@dataclass(frozen=True, slots=True)
class AgeCond:
    since: tuple[str, tuple[str, ...]]
    at_least_ms: int


@dataclass(frozen=True, slots=True)
class EverCond:
    name: str
    where: Where


@dataclass(frozen=True, slots=True)
class TraitsCond:
    pairs: tuple[tuple[tuple[str, tuple[str, ...]], tuple[Scalar, ...]], ...]


@dataclass(frozen=True, slots=True)
class AllCond:
    of: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyCond:
    of: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class NotCond:
    of: Condition


Condition = (
    EventCond
    | SpikeCond
    | DropCond
    | AbsentCond
    | AnomalyCond
    | OverdueCond
    | ThresholdCond
    | DwellCond
    | DateCond
    | AgeCond
    | EverCond
    | TraitsCond
    | AllCond
    | AnyCond
    | NotCond
)


@dataclass(frozen=True, slots=True)
class Action:
    channel: str
    template: str | None = None
    message: str | None = None
    title: str | None = None  # the email subject or push title, when no template gives one
    # the channel's settings for this trigger, over the server's: `url` and `format` for a
    # webhook, `from` and `reply_to` for an email
    settings: tuple[tuple[str, str], ...] = ()


# per channel, the settings a trigger may give in its action
ACTION_SETTINGS = {"webhook": ("url", "format"), "email": ("from", "reply_to")}
WEBHOOK_FORMATS = ("standard", "slack")


@dataclass(frozen=True, slots=True)
class Signal:
    """A goal or failure: an event (optionally filtered) expected within a window."""

    event: str
    within_ms: int
    where: Where = Where()


GUARD_ACTIONS = ("shadow", "pause", "off")


@dataclass(frozen=True, slots=True)
class Guard:
    """What the auto-guard does with this trigger when its outreach does harm or no good."""

    action: str = "shadow"  # shadow | pause | off
    effect: float = 0.05  # the smallest change in the failure rate worth detecting
    max_unsubscribes: float = 0.02  # share of treated subjects who unsubscribe after it
    max_dismissals: float = 0.6  # share of in-app and chat messages dismissed


@dataclass(frozen=True, slots=True)
class Trigger:
    id: str
    when: Condition
    action: Action
    scope: str = "user"
    description: str = ""
    cooldown_ms: int = 0
    priority: int = 0
    holdout: float = 0.0
    goal: Signal | None = None
    failure: Signal | None = None
    mode: str = "live"
    problem: str | None = None  # triggers naming one problem reach out once per episode
    guard: Guard = Guard()
    file: str = ""
    line: int = 0


# --- durations --------------------------------------------------------------------------------


def parse_duration(text: object) -> int:
    """`30s`, `10m`, `3h`, `7d`, `2w` as milliseconds; ValueError with what is allowed."""
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if m is None or int(m.group(1)) == 0:
        raise ValueError(
            f"bad duration {text!r}: write a positive whole number and a unit "
            "s, m, h, d or w, e.g. 30s, 10m, 3h, 7d, 2w"
        )
    return int(m.group(1)) * UNITS_MS[m.group(2)]


def format_duration(ms: int) -> str:
    """`7d`, `3h`, or the two largest units when one is not exact (`13d 14h`)."""
    parts = []
    rest = ms
    for unit in ("d", "h", "m", "s"):
        size = UNITS_MS[unit]
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
            if len(parts) == 2 or rest == 0:
                break
        elif parts:
            break
    return " ".join(parts) if parts else f"{ms}ms"


# --- parsing ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """One problem at one node; caught at the trigger level so the rest is still checked."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


# YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turns
# `country: NO` into false. Made by `type`, not a class statement: compiled by mypyc (setup.py),
# a class statement's class attributes would be fixed.
_Loader: type[yaml.CSafeLoader] = type(
    "_Loader",
    (yaml.CSafeLoader,),
    {
        "yaml_implicit_resolvers": {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
            for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
        }
    },
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_constructor = yaml.SafeLoader(stream="")


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise _Invalid(node, "expected a single value here, not a list or mapping")
    if node.tag == "tag:yaml.org,2002:merge":
        raise _Invalid(node, "YAML merge keys (<<) are not supported: write the keys out")
    try:
        return _constructor.construct_object(node, deep=True)
    except Exception as exc:  # explicit tags (!!int abc) fail in several ways
        raise _Invalid(node, f"cannot read the value {node.value!r}: {exc}") from None
    finally:
        _constructor.constructed_objects.clear()  # the constructor would keep every node


def _mapping(node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _Invalid(node, f"{what} must be a mapping (key: value)")
    items: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = _scalar(key_node)
        if not isinstance(key, str):
            key = str(key)
        if key in seen:
            raise _Invalid(key_node, f"'{key}' is given twice in {what}")
        seen.add(key)
        items.append((key, key_node, value_node))
    return items


def _fields(
    node: yaml.Node, what: str, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, yaml.Node]:
    items = _mapping(node, what)
    allowed = required + optional
    out: dict[str, yaml.Node] = {}
    for key, key_node, value_node in items:
        if key not in allowed:
            raise _Invalid(
                key_node, f"unknown key '{key}' in {what}; allowed: {', '.join(allowed)}"
            )
        out[key] = value_node
    for key in required:
        if key not in out:
            raise _Invalid(node, f"{what} needs '{key}' (allowed keys: {', '.join(allowed)})")
    return out


def _text(node: yaml.Node, what: str) -> str:
    value = _scalar(node)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(node, f"{what} must be a non-empty text")
    return value


def _duration(node: yaml.Node, what: str) -> int:
    value = _scalar(node)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _Invalid(node, f"{what}: {exc}") from None


def _number(
    node: yaml.Node, what: str, low: float | None = None, high: float | None = None
) -> float:
    value = _scalar(node)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(node, f"{what} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise _Invalid(node, f"{what} must be a finite number, got {node.value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _Invalid(node, f"{what} must be {bounds}, got {value!r}")
    return float(value)


def _count(node: yaml.Node, what: str) -> int:
    value = _scalar(node)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(node, f"{what} must be a whole number of at least 1, got {value!r}")
    return value


def _values(node: yaml.Node, what: str) -> tuple[Scalar, ...]:
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    out: list[Scalar] = []
    for item in nodes:
        value = _scalar(item)
        if value is None or not isinstance(value, str | int | float | bool):
            raise _Invalid(item, f"{what} must be a text, number or boolean (or a list of them)")
        out.append(value)
    if not out:
        raise _Invalid(node, f"{what} must list at least one value")
    return tuple(out)


def _where(node: yaml.Node | None) -> Where:
    if node is None:
        return Where()
    items = _mapping(node, "where")
    return Where(tuple((key, _values(value, f"where.{key}")) for key, _, value in items))


def _trait_path(node: yaml.Node, what: str, scope: str) -> tuple[str, tuple[str, ...]]:
    text = _text(node, what)
    root, dot, rest = text.partition(".")
    if dot and root in ("traits", "account"):
        if root == "account" and scope == "account":
            raise _Invalid(node, f"{what}: in an account-scoped trigger, use traits.* instead")
        return root, tuple(rest.split("."))
    return "traits", tuple(text.split("."))


_LEAVES = (
    "event",
    "spike",
    "drop",
    "absent",
    "threshold",
    "dwell",
    "date",
    "age",
    "ever",
    "traits",
    "anomaly",
    "overdue",
)
_COMBINATORS = ("all", "any", "not")
CONDITION_KINDS = _LEAVES + _COMBINATORS


def _condition(node: yaml.Node, scope: str, depth: int = 0) -> Condition:
    if depth > MAX_DEPTH:
        raise _Invalid(node, f"conditions are nested more than {MAX_DEPTH} deep")
    items = _mapping(node, "a condition")
    if len(items) != 1:
        raise _Invalid(
            node,
            "a condition is a mapping with exactly one key, the condition kind; combine several "
            "with all: [...] or any: [...]",
        )
    kind, key_node, body = items[0]
    if kind not in CONDITION_KINDS:
        raise _Invalid(
            key_node, f"unknown condition '{kind}'; allowed: {', '.join(CONDITION_KINDS)}"
        )
    if kind in ("all", "any"):
        if not isinstance(body, yaml.SequenceNode) or not body.value:
            raise _Invalid(body, f"{kind} takes a non-empty list of conditions")
        children = tuple(_condition(child, scope, depth + 1) for child in body.value)
        return AllCond(children) if kind == "all" else AnyCond(children)
    if kind == "not":
        child = _condition(body, scope, depth + 1)
        if _instantaneous(child):
            raise _Invalid(
                body,
                "not: cannot negate a condition that is true only at the instant of an event "
                "(event without 'within', or a threshold on properties.*); "
                "give the event a 'within' window",
            )
        return NotCond(child)
    return _LEAF_PARSERS[kind](body, scope)


def _event(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "event", ("name",), ("where", "count", "within"))
    within = _duration(f["within"], "event.within") if "within" in f else None
    count = _count(f["count"], "event.count") if "count" in f else 1
    if count > 1 and within is None:
        raise _Invalid(f["count"], "event.count needs 'within', the window to count in")
    return EventCond(_text(f["name"], "event.name"), _where(f.get("where")), count, within)


def _spike(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "spike", ("name",), ("where", "window", "factor", "baseline", "min_count"))
    window = _duration(f["window"], "spike.window") if "window" in f else 600_000
    baseline = _duration(f["baseline"], "spike.baseline") if "baseline" in f else 604_800_000
    if baseline < window:
        raise _Invalid(body, "spike.baseline must be at least as long as spike.window")
    return SpikeCond(
        name=_text(f["name"], "spike.name"),
        where=_where(f.get("where")),
        window_ms=window,
        factor=_number(f["factor"], "spike.factor", low=1.0) if "factor" in f else 5.0,
        baseline_ms=baseline,
        min_count=_count(f["min_count"], "spike.min_count") if "min_count" in f else 10,
    )


def _drop(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "drop", ("name",), ("where", "window", "below", "baseline"))
    window = _duration(f["window"], "drop.window") if "window" in f else 604_800_000
    baseline = _duration(f["baseline"], "drop.baseline") if "baseline" in f else 2_419_200_000
    if baseline < window:
        raise _Invalid(body, "drop.baseline must be at least as long as drop.window")
    return DropCond(
        name=_text(f["name"], "drop.name"),
        where=_where(f.get("where")),
        window_ms=window,
        below=_number(f["below"], "drop.below", low=0.0, high=1.0) if "below" in f else 0.5,
        baseline_ms=baseline,
    )


def _absent(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "absent", ("name", "for"), ("where",))
    return AbsentCond(
        _text(f["name"], "absent.name"), _where(f.get("where")), _duration(f["for"], "absent.for")
    )


ANOMALY_DIRECTIONS = ("up", "down", "both")
ANOMALY_SENSITIVITIES = ("low", "medium", "high")


def _anomaly(body: yaml.Node, scope: str) -> Condition:
    f = _fields(
        body, "anomaly", ("name",), ("where", "value", "window", "direction", "sensitivity")
    )
    window = _duration(f["window"], "anomaly.window") if "window" in f else 600_000
    if window < 60_000:
        raise _Invalid(f["window"], "anomaly.window must be at least 1m")
    value = None
    if "value" in f:
        source = _scalar(f["value"])
        if isinstance(source, bool) or not isinstance(source, str):
            raise _Invalid(f["value"], "anomaly.value must be an expression, e.g. properties.ms")
        try:
            value = expr.parse(source)
        except expr.ExpressionError as exc:
            raise _Invalid(f["value"], f"anomaly.value does not parse: {exc}") from None
        if any(root != "properties" for root, _ in value.names):
            raise _Invalid(
                f["value"], "anomaly.value reads the event's properties.* only, e.g. properties.ms"
            )
    choices = {}
    for key, allowed, default in (
        ("direction", ANOMALY_DIRECTIONS, "up"),
        ("sensitivity", ANOMALY_SENSITIVITIES, "medium"),
    ):
        chosen = _scalar(f[key]) if key in f else default
        if chosen not in allowed:
            raise _Invalid(f[key], f"anomaly.{key} {chosen!r}: give one of {', '.join(allowed)}")
        choices[key] = str(chosen)
    return AnomalyCond(
        _text(f["name"], "anomaly.name"),
        _where(f.get("where")),
        value,
        window,
        choices["direction"],
        choices["sensitivity"],
    )


def _overdue(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "overdue", ("name",), ("where", "factor", "min_events", "lapse"))
    min_events = _count(f["min_events"], "overdue.min_events") if "min_events" in f else 3
    if min_events < 2:
        raise _Invalid(f["min_events"], "overdue.min_events must be at least 2: a gap needs two")
    if "factor" in f and "lapse" in f:
        raise _Invalid(
            f["lapse"],
            "overdue takes factor (silence against the typical gap) or lapse (the probability "
            "of having stopped), not both: remove one",
        )
    lapse = (
        _number(f["lapse"], "overdue.lapse", low=detect.LAPSE_MIN, high=detect.LAPSE_MAX)
        if "lapse" in f
        else None
    )
    return OverdueCond(
        _text(f["name"], "overdue.name"),
        _where(f.get("where")),
        _number(f["factor"], "overdue.factor", low=1.0) if "factor" in f else 2.0,
        min_events,
        lapse,
    )


def _threshold(body: yaml.Node, scope: str) -> Condition:
    items = _mapping(body, "threshold")
    value_node: yaml.Node | None = None
    ops: list[tuple[str, yaml.Node]] = []
    for key, key_node, value in items:
        if key == "value":
            value_node = value
        elif key in COMPARATORS:
            ops.append((key, value))
        else:
            raise _Invalid(
                key_node,
                f"unknown key '{key}' in threshold; allowed: value and one of "
                + ", ".join(f'"{c}"' for c in COMPARATORS),
            )
    if value_node is None:
        raise _Invalid(body, "threshold needs 'value', an expression such as traits.a / traits.b")
    if len(ops) != 1:
        raise _Invalid(
            body,
            "threshold needs exactly one comparison: "
            + ", ".join(f'"{c}"' for c in COMPARATORS)
            + ' (quote it in YAML, e.g. ">=": 0.85)',
        )
    source = _scalar(value_node)
    if isinstance(source, bool) or not isinstance(source, str | int | float):
        raise _Invalid(value_node, "threshold.value must be an expression text")
    try:
        parsed = expr.parse(str(source))
    except expr.ExpressionError as exc:
        raise _Invalid(value_node, f"threshold.value does not parse: {exc}") from None
    if scope == "account" and any(root == "account" for root, _ in parsed.names):
        raise _Invalid(value_node, "in an account-scoped trigger, read account traits as traits.*")
    op, target = ops[0]
    return ThresholdCond(parsed, op, _number(target, f'threshold "{op}"'))


def _dwell(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "dwell", ("page", "for"), ("unless",))
    if scope != "user":
        raise _Invalid(body, "dwell follows one person's page views: use it with scope: user")
    unless: tuple[str, ...] = ()
    if "unless" in f:
        unless = tuple(str(v) for v in _values(f["unless"], "dwell.unless"))
    return DwellCond(_text(f["page"], "dwell.page"), _duration(f["for"], "dwell.for"), unless)


def _date(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "date", ("trait", "within"), ())
    return DateCond(
        _trait_path(f["trait"], "date.trait", scope), _duration(f["within"], "date.within")
    )


def _age(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "age", ("since", "at_least"), ())
    return AgeCond(
        _trait_path(f["since"], "age.since", scope), _duration(f["at_least"], "age.at_least")
    )


def _ever(body: yaml.Node, scope: str) -> Condition:
    f = _fields(body, "ever", ("name",), ("where",))
    return EverCond(_text(f["name"], "ever.name"), _where(f.get("where")))


def _traits(body: yaml.Node, scope: str) -> Condition:
    items = _mapping(body, "traits")
    if not items:
        raise _Invalid(body, "traits needs at least one trait: value pair")
    pairs = []
    for key, key_node, value in items:
        path = _trait_path(key_node, "traits key", scope)
        pairs.append((path, _values(value, f"traits.{key}")))
    return TraitsCond(tuple(pairs))


_LEAF_PARSERS = {
    "event": _event,
    "anomaly": _anomaly,
    "overdue": _overdue,
    "spike": _spike,
    "drop": _drop,
    "absent": _absent,
    "threshold": _threshold,
    "dwell": _dwell,
    "date": _date,
    "age": _age,
    "ever": _ever,
    "traits": _traits,
}


def _instantaneous(cond: Condition) -> bool:
    """True for conditions that hold only while the event that makes them true is applied."""
    if isinstance(cond, EventCond):
        return cond.within_ms is None
    if isinstance(cond, ThresholdCond):
        return any(root == "properties" for root, _ in cond.value.names)
    if isinstance(cond, AllCond | AnyCond):
        return any(_instantaneous(c) for c in cond.of)
    if isinstance(cond, NotCond):
        return _instantaneous(cond.of)
    return False


def _guard(node: yaml.Node) -> Guard:
    f = _fields(node, "guard", (), ("action", "effect", "max_unsubscribes", "max_dismissals"))
    action = _scalar(f["action"]) if "action" in f else "shadow"
    if action not in GUARD_ACTIONS:
        raise _Invalid(
            f["action"], f"guard.action {action!r}: give one of {', '.join(GUARD_ACTIONS)}"
        )
    return Guard(
        str(action),
        _number(f["effect"], "guard.effect", 0.005, 0.5) if "effect" in f else 0.05,
        _number(f["max_unsubscribes"], "guard.max_unsubscribes", 0.0, 1.0)
        if "max_unsubscribes" in f
        else 0.02,
        _number(f["max_dismissals"], "guard.max_dismissals", 0.0, 1.0)
        if "max_dismissals" in f
        else 0.6,
    )


def _signal(node: yaml.Node, what: str) -> Signal:
    f = _fields(node, what, ("event", "within"), ("where",))
    return Signal(
        _text(f["event"], f"{what}.event"),
        _duration(f["within"], f"{what}.within"),
        _where(f.get("where")),
    )


def _action(node: yaml.Node) -> Action:
    known = sorted({k for keys in ACTION_SETTINGS.values() for k in keys})
    f = _fields(node, "action", ("channel",), ("template", "message", "title", *known))
    channel = _scalar(f["channel"])
    if channel not in CHANNELS:
        raise _Invalid(f["channel"], f"unknown channel {channel!r}; allowed: {', '.join(CHANNELS)}")
    template = _text(f["template"], "action.template") if "template" in f else None
    message = _text(f["message"], "action.message") if "message" in f else None
    if (template is None) == (message is None):
        raise _Invalid(node, "action needs exactly one of 'template' (a file) or 'message' (text)")
    title = _text(f["title"], "action.title") if "title" in f else None
    allowed = ACTION_SETTINGS.get(str(channel), ())
    settings = []
    for key in known:
        if key not in f:
            continue
        if key not in allowed:
            raise _Invalid(
                f[key],
                f"'{key}' is not a setting of the {channel} channel"
                + (f"; it takes: {', '.join(allowed)}" if allowed else ""),
            )
        value = _text(f[key], f"action.{key}")
        if key == "format" and value not in WEBHOOK_FORMATS:
            raise _Invalid(f[key], f"format {value!r}: give one of {', '.join(WEBHOOK_FORMATS)}")
        if key == "url" and not value.startswith(("https://", "http://")):
            raise _Invalid(f[key], f"url {value!r} must start with https:// (or http://)")
        settings.append((key, value))
    return Action(str(channel), template, message, title, tuple(settings))


_TRIGGER_KEYS = (
    "id",
    "description",
    "scope",
    "when",
    "action",
    "cooldown",
    "priority",
    "holdout",
    "goal",
    "failure",
    "mode",
    "problem",
    "guard",
)


def _trigger(node: yaml.Node, file: str, problems: list[Problem]) -> Trigger | None:
    line = node.start_mark.line + 1
    trigger_id: str | None = None
    if isinstance(node, yaml.MappingNode):  # name the trigger in every problem, if it has an id
        for key_node, value_node in node.value:
            if (
                isinstance(key_node, yaml.ScalarNode)
                and key_node.value == "id"
                and isinstance(value_node, yaml.ScalarNode)
                and value_node.value
            ):
                trigger_id = str(value_node.value)
    try:
        required = ("id", "when", "action")
        optional = tuple(k for k in _TRIGGER_KEYS if k not in required)
        f = _fields(node, "a trigger", required, optional)
        raw_id = _scalar(f["id"])
        if not isinstance(raw_id, str) or not _TRIGGER_ID.match(raw_id):
            raise _Invalid(
                f["id"], f"trigger id {raw_id!r} must use only a-z, 0-9 and '-', e.g. storage-85"
            )
        trigger_id = raw_id
        scope = _scalar(f["scope"]) if "scope" in f else "user"
        if scope not in SCOPES:
            raise _Invalid(f["scope"], f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
        mode = _scalar(f["mode"]) if "mode" in f else "live"
        if mode not in MODES:
            raise _Invalid(f["mode"], f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        priority = _scalar(f["priority"]) if "priority" in f else 0
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise _Invalid(f["priority"], f"priority must be a whole number, got {priority!r}")
        description = _text(f["description"], "description") if "description" in f else ""
        problem = _scalar(f["problem"]) if "problem" in f else None
        if problem is not None and (not isinstance(problem, str) or not _TRIGGER_ID.match(problem)):
            raise _Invalid(
                f["problem"],
                f"problem {problem!r} must use only a-z, 0-9 and '-', e.g. checkout-errors",
            )
        return Trigger(
            id=trigger_id,
            when=_condition(f["when"], scope),
            action=_action(f["action"]),
            scope=scope,
            description=description,
            cooldown_ms=_duration(f["cooldown"], "cooldown") if "cooldown" in f else 0,
            priority=priority,
            holdout=_number(f["holdout"], "holdout", 0.0, 0.99) if "holdout" in f else 0.0,
            goal=_signal(f["goal"], "goal") if "goal" in f else None,
            failure=_signal(f["failure"], "failure") if "failure" in f else None,
            mode=mode,
            problem=problem,
            guard=_guard(f["guard"]) if "guard" in f else Guard(),
            file=file,
            line=line,
        )
    except _Invalid as exc:
        problems.append(Problem(file, exc.node.start_mark.line + 1, trigger_id, exc.message))
        return None


MAX_DEPTH = 32  # nesting of conditions; YAML may nest a few levels more around them


def _scan(text: str) -> tuple[int, str] | None:
    """Refuse aliases and deep nesting before building the node tree: both can make a tiny file
    take exponential time or exhaust the stack. Walks YAML's event stream, so it never
    recurses."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.AliasEvent):
            return (
                line,
                f"YAML aliases (*{event.anchor}) are not supported: write the value out",
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH * 2 + 8:
                return line, "the file is nested too deeply"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def parse_playbooks(sources: Iterable[tuple[str, str]]) -> list[Trigger]:
    """Parse playbook texts, given as (file name, YAML text); raises PlaybookError listing every
    problem found in every file."""
    problems: list[Problem] = []
    triggers: list[Trigger] = []
    first_seen: dict[str, Trigger] = {}
    for file, text in sources:
        try:
            trouble = _scan(text)
            if trouble is not None:
                problems.append(Problem(file, trouble[0], None, trouble[1]))
                continue
            root = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            if exc.problem is not None and "maximum nesting depth" in exc.problem:
                # libyaml's own limit (since 0.2.6), met before `_scan` sees as deep
                problems.append(Problem(file, line, None, "the file is nested too deeply"))
            else:
                problems.append(Problem(file, line, None, f"not valid YAML: {exc.problem}"))
            continue
        except yaml.YAMLError as exc:
            problems.append(Problem(file, 1, None, f"not valid YAML: {exc}"))
            continue
        if root is None:
            continue
        try:
            top = _fields(root, "a playbook file", ("triggers",), ())
            listed = top["triggers"]
            if not isinstance(listed, yaml.SequenceNode):
                raise _Invalid(listed, "triggers must be a list, each item starting with '- id:'")
        except _Invalid as exc:
            problems.append(Problem(file, exc.node.start_mark.line + 1, None, exc.message))
            continue
        for item in listed.value:
            trigger = _trigger(item, file, problems)
            if trigger is None:
                continue
            earlier = first_seen.get(trigger.id)
            if earlier is not None:
                problems.append(
                    Problem(
                        file,
                        trigger.line,
                        trigger.id,
                        f"duplicate trigger id; first defined at {earlier.file}:{earlier.line}",
                    )
                )
                continue
            first_seen[trigger.id] = trigger
            triggers.append(trigger)
    if problems:
        raise PlaybookError(problems)
    return triggers
