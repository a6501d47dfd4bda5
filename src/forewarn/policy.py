"""The policy over the engine's firings: each firing's decision, from what the engine knows of
the subject and what the host knows of its consent. Pure; replay and the live server both run
their firings through an `Outreach`, so a backtest shows what would really have gone out.

A message is held for the priority window before it may go; a more important trigger firing
for the same subject inside it takes its place, and the one it displaces is changed to
`suppressed` / `lower_priority`. Replay therefore prints a firing once its window has passed
(`Holding`); the live server updates the displaced firing's record and cancels its outbox row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from forewarn import decide
from forewarn.decide import Facts, History, Policy, Spec
from forewarn.engine import Firing, State, traits_of
from forewarn.playbook import Trigger

# traits the policy reads, kept in both scopes whatever the triggers read
POLICY_TRAITS = ("email", "timezone", "do_not_contact", "unsubscribed")

# what the host adds about a subject: (scope, subject, traits) -> (unsubscribed channels,
# email bounced, why the subject is suppressed or None)
Consent = Callable[[str, str, dict[str, Any]], tuple[frozenset[str], bool, str | None]]


def spec_of(trigger: Trigger) -> Spec:
    return Spec(
        trigger.id,
        trigger.action.channel,
        trigger.mode,
        trigger.priority,
        trigger.holdout,
        trigger.problem,
    )


class Outreach:
    def __init__(
        self,
        state: State,
        triggers: list[Trigger],
        policy: Policy | None = None,
        consent: Consent | None = None,
    ) -> None:
        self.state = state
        self.policy = policy or Policy()
        self.history = History(self.policy)
        self.specs = {t.id: spec_of(t) for t in triggers}
        self.consent = consent

    def stored(
        self, trigger: str, channel: str, at_ms: int, send_at_ms: int, ref: Any
    ) -> decide.Record:
        """The record of an outreach a host stored (a firing sent or held out): what the
        policy reads of its trigger is today's (a trigger since removed: no problem, priority
        0)."""
        spec = self.specs.get(trigger)
        problem, priority = (spec.problem, spec.priority) if spec else (None, 0)
        return decide.Record(trigger, channel, problem, priority, at_ms, send_at_ms, ref)

    def apart(self, scope: str, subject: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The subject's own traits, and its (newest) account's; an account's are both."""
        state = self.state
        if scope == "account":
            own = traits_of(state, True, subject)
            return own, own
        own = traits_of(state, False, subject)
        user = state.users.get(subject)
        if user is None or not user.accounts:
            return own, {}
        return own, traits_of(state, True, user.accounts[-1])

    def traits(self, scope: str, subject: str) -> dict[str, Any]:
        """The subject's traits; a user's are laid over its account's."""
        own, account = self.apart(scope, subject)
        return own if own is account else {**account, **own}

    def facts(self, scope: str, subject: str) -> Facts:
        traits = self.traits(scope, subject)
        urgent = self.state.urgent
        suppressed = None
        keys = [f"{scope}:{subject}"]
        if scope == "user":
            user = self.state.users.get(subject)
            if user is not None and user.accounts:
                keys += [f"account:{a}" for a in user.accounts]
        if any(key in urgent for key in keys):
            suppressed = "an urgent ticket is open"
        unsubscribed: frozenset[str] = frozenset()
        bounced = False
        if self.consent is not None:
            unsubscribed, bounced, held = self.consent(scope, subject, traits)
            suppressed = suppressed or held
        return Facts(traits, unsubscribed, bounced, suppressed)

    def decide(self, firing: Firing) -> list[Any]:
        """Decide `firing` in place. The earlier firings it displaced become `lower_priority`:
        those still in memory are changed in place; for those the host already stored, their
        `ref`s are returned, for the host to change."""
        spec = self.specs[firing.trigger]
        d = self.history.decide(
            spec,
            firing.scope,
            firing.subject,
            firing.at_ms,
            firing.cooldown,
            self.facts(firing.scope, firing.subject),
            ref=firing,
        )
        firing.decision, firing.reason, firing.send_at_ms = d.decision, d.reason, d.send_at_ms
        stored = []
        for record in d.displaced:
            if isinstance(record.ref, Firing):
                old = record.ref
                old.decision, old.reason, old.send_at_ms = (
                    decide.SUPPRESSED,
                    "lower_priority",
                    None,
                )
            else:
                stored.append(record.ref)
        return stored

    def recorded(self, firing: Firing, ref: Any) -> None:
        """The host stored `firing` as `ref`: its record refers to that from now on (so a
        later displacement names the stored row, and the firing itself can be let go)."""
        for record in self.history.by_subject.get((firing.scope, firing.subject), ()):
            if record.ref is firing:
                record.ref = ref


class Holding:
    """Replay's printer: passes each decided firing on once no later firing can displace it."""

    def __init__(self, outreach: Outreach, emit: Callable[[Firing], None]) -> None:
        self.outreach = outreach
        self.emit = emit
        self.held: deque[Firing] = deque()

    def __call__(self, firing: Firing) -> None:
        self.outreach.decide(firing)
        self.release(firing.at_ms - self.outreach.policy.priority_window_ms)
        self.held.append(firing)

    def release(self, upto_ms: int | None = None) -> None:
        """Pass on the firings at or before `upto_ms` (all of them when None)."""
        held = self.held
        while held and (upto_ms is None or held[0].at_ms <= upto_ms):
            self.emit(held.popleft())
