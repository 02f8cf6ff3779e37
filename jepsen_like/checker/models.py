"""Sequential specifications the checker searches against.

A model is a pure function ``step(state, op) -> (ok, new_state)`` plus an
initial state.  Purity and hashable states are what make Lowe's memo sound:
the search identifies a configuration by (set of linearized operations,
state), so two paths reaching the same pair are interchangeable.

Models here describe *one key*: the checker splits a history per key first
(P-compositionality), so a key-value map is checked as many independent
single-key models.

Operations of unknown outcome need no special case in a model: the search
only tries to linearize them when ``step`` says they can succeed in the
current state, and is free to leave them out (a cas whose comparison fails
then is the same as a cas that never happened).

A cas that failed with a Conflict is a completed operation of its own,
``cas-conflict`` with value ``(expected, reported)`` (see
:mod:`jepsen_like.checker.history`): it changes nothing and fits a state only
if the condition is false there and, when ``reported`` is known, the state is
the one reported.  So a Conflict answered from a stale view is caught, where
reading a failed cas as "did not happen" (Knossos's convention) accepts any.

Besides ``step``, a model offers two optional accelerations (see
:class:`BaseModel` for the neutral defaults):

* ``read_reachable`` lets the search drop a configuration from which a read
  that must come next can no longer succeed;
* ``specialize`` returns a version of the model for one key's operations that
  merges states no operation can ever tell apart, so the memo recognises
  them as one.  The built-in models merge values that no read returns and no
  cas expects (nor extends to one, by appending): after concurrent blind
  appends that a later put overwrites, every order of them is one state
  instead of k! different strings.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from .history import CAS_CONFLICT, UNREPORTED


class OpLike(Protocol):
    """What a model looks at: the function and the (frozen) value."""

    @property
    def f(self) -> str: ...

    @property
    def value(self) -> Any: ...


class Model(Protocol):
    """A sequential specification of one key.

    ``fs`` lists the functions the model understands (the checker rejects
    others up front rather than calling every history non-linearizable);
    ``read_fs`` lists those that never change the state, which lets the
    checker drop reads whose result is unknown (they constrain nothing) and
    linearize a fitting read as early as possible.

    ``step`` must depend on the operation's ``f`` and ``value`` only: the
    search treats unknown-outcome operations with equal ``(f, value)`` as
    interchangeable.  ``describe`` renders a state for reports.
    """

    name: str
    fs: frozenset[str]
    read_fs: frozenset[str]

    def init(self) -> Hashable: ...

    def step(self, state: Any, op: OpLike) -> tuple[bool, Any]: ...

    def describe(self, state: Any) -> str: ...

    def read_reachable(self, state: Any, read: OpLike, changers: Sequence[OpLike]) -> bool: ...

    def specialize(self, ops: Sequence[OpLike]) -> Model: ...

    def irrelevant(self, op: OpLike) -> bool: ...

    def symmetry_class(self, op: OpLike) -> Hashable: ...


class BaseModel:
    """Neutral defaults for the optional parts of :class:`Model`."""

    name = "model"
    fs: frozenset[str] = frozenset()
    read_fs: frozenset[str] = frozenset()

    def init(self) -> Hashable:
        return None

    def step(self, state: Any, op: OpLike) -> tuple[bool, Any]:
        raise NotImplementedError

    def describe(self, state: Any) -> str:
        return repr(state)

    def read_reachable(self, state: Any, read: OpLike, changers: Sequence[OpLike]) -> bool:
        """Could some order of some of ``changers`` make ``read`` succeed?

        ``changers`` are the state-changing operations that may still come
        before ``read``.  ``True`` is always a safe answer; ``False`` must be
        certain, since the search then abandons the configuration.
        """
        return True

    def specialize(self, ops: Sequence[OpLike]) -> Model:
        """A model for exactly these operations, free to merge states they
        cannot distinguish.  The default merges nothing."""
        return self

    def irrelevant(self, op: OpLike) -> bool:
        """May this unknown-outcome operation be left out of the search?

        Asked of a specialized model only.  ``True`` promises that any
        linearization using the operation still works without it; the search
        then never tries it, which matters because every unknown operation
        stays a candidate until the end of the history.
        """
        return False

    def symmetry_class(self, op: OpLike) -> Hashable:
        """Unknown-outcome operations of one class must act alike: ``step``
        gives the same answer for each, from every state.  The search then
        tries only the earliest-invoked remaining one of a class.  The default
        class is ``(f, value)``."""
        return (op.f, op.value)


class _Unobserved:
    """A state no remaining operation can tell from another of its kind.

    ``kind`` keeps what an append needs to know (string, list or other value)
    so that merging never changes which operations succeed.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<unobserved {self.kind}>"

    def __reduce__(self) -> str:
        return f"UNOBSERVED_{self.kind.upper()}"


UNOBSERVED_STR = _Unobserved("str")
UNOBSERVED_LIST = _Unobserved("list")
UNOBSERVED_OTHER = _Unobserved("other")


def _unobserved(value: Any) -> _Unobserved:
    if isinstance(value, str):
        return UNOBSERVED_STR
    if isinstance(value, tuple):
        return UNOBSERVED_LIST
    return UNOBSERVED_OTHER


def _prefixes(value: Any) -> list[Any]:
    """The value and everything appending could grow into it."""
    if isinstance(value, str | tuple):
        return [value[:i] for i in range(len(value) + 1)]
    return [value]


def _show(value: Any) -> str:
    return "nil" if value is None else repr(value)


def _conflict_fits(state: Any, holds: bool, reported: Any) -> bool:
    """A Conflict fits a state where its condition does not hold and which is
    the state it reported (when the history names that state)."""
    return not holds and (reported is UNREPORTED or state == reported)


def _conflict_observed(ops: Sequence[OpLike]) -> tuple[set[Any], bool]:
    """The values Conflicts tell apart, and whether any reported no state:
    such a Conflict fits every state but one, so no write is irrelevant to it."""
    observed: set[Any] = set()
    open_claims = False
    for op in ops:
        if op.f == CAS_CONFLICT:
            expected, reported = op.value
            observed.add(expected)
            if reported is UNREPORTED:
                open_claims = True
            else:
                observed.add(reported)
    return observed, open_claims


class RegisterModel(BaseModel):
    """A single register: ``read`` / ``write`` / ``cas``, starting at nil.

    ``cas`` carries ``[expected, new]``; a successful (``ok``) cas means the
    register held ``expected``, as in Jepsen's etcd and Knossos.
    ``cas-conflict`` carries ``(expected, reported)``: the register did not
    hold ``expected`` (and held ``reported``, when known).
    """

    name = "register"
    fs = frozenset({"read", "write", "cas", CAS_CONFLICT})
    read_fs = frozenset({"read", CAS_CONFLICT})

    def __init__(self, observed: frozenset[Any] | None = None, open_claims: bool = False) -> None:
        #: Values some read returns or some cas expects; others are merged.
        self.observed = observed
        #: Whether some Conflict reported no state (see :meth:`irrelevant`).
        self.open_claims = open_claims

    def _canon(self, value: Any) -> Any:
        observed = self.observed
        if observed is None or value is None or value in observed:
            return value
        return _unobserved(value)

    def step(self, state: Any, op: OpLike) -> tuple[bool, Any]:
        f = op.f
        if f == "read":
            return state == op.value, state
        if f == "write":
            return True, self._canon(op.value)
        if f == "cas":
            expected, new = op.value
            if state == expected:
                return True, self._canon(new)
            return False, state
        if f == CAS_CONFLICT:
            expected, reported = op.value
            return _conflict_fits(state, state == expected, reported), state
        raise ValueError(f"register model has no function {f!r}")

    def describe(self, state: Any) -> str:
        return _show(state)

    def read_reachable(self, state: Any, read: OpLike, changers: Sequence[OpLike]) -> bool:
        """The value read must be the current one or be written by a changer."""
        if read.f == CAS_CONFLICT:
            return True
        target = read.value
        if state == target:
            return True
        for op in changers:
            if op.f == "write" and op.value == target:
                return True
            if op.f == "cas" and op.value[1] == target:
                return True
        return False

    def specialize(self, ops: Sequence[OpLike]) -> Model:
        observed: set[Any] = set()
        for op in ops:
            if op.f == "read":
                observed.add(op.value)
            elif op.f == "cas":
                observed.add(op.value[0])
        claimed, open_claims = _conflict_observed(ops)
        return RegisterModel(frozenset(observed | claimed), open_claims)

    def symmetry_class(self, op: OpLike) -> Hashable:
        """Writes (and cas with one expected value) of values nobody tells
        apart all lead to the same merged state: one class."""
        if op.f == "write":
            return ("write", self._canon(op.value))
        if op.f == "cas":
            expected, new = op.value
            return ("cas", expected, self._canon(new))
        return (op.f, op.value)

    def irrelevant(self, op: OpLike) -> bool:
        """An unknown write (or cas) of a value nobody reads or expects.

        Once it took effect nothing but a later write can succeed, and that
        write succeeds just as well without it. Not so while a Conflict that
        reported no state stands: any value but its expected one lets it fit.
        """
        if self.observed is None or self.open_claims:
            return False
        if op.f == "write":
            return op.value is not None and op.value not in self.observed
        if op.f == "cas":
            new = op.value[1]
            return new is not None and new not in self.observed
        return False

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RegisterModel)
            and other.observed == self.observed
            and other.open_claims == self.open_claims
        )

    def __hash__(self) -> int:
        return hash((RegisterModel, self.observed, self.open_claims))

    def __repr__(self) -> str:
        return "RegisterModel()"


class KvModel(BaseModel):
    """One key of a key-value map: ``get`` / ``put`` / ``append`` / ``delete``.

    The state is the key's value, ``None`` while the key is absent (initially
    and after ``delete``).  ``missing`` is what a ``get`` of an absent key
    returns: ``None`` for kvsvr, ``""`` for the ``kv`` corpus files.  ``append``
    concatenates a string to a string value (absent counts as ``""``); any
    other appended value is added as one element of a list (Jepsen's
    list-append).  The register functions ``read`` / ``write`` / ``cas`` are
    accepted as aliases so that one model covers kvsvr histories that mix
    them (``cas [nil v]`` succeeds on an absent key), and so is
    ``cas-conflict`` (a cas that failed with a Conflict: see the module).
    """

    name = "kv"
    fs = frozenset({"get", "put", "append", "delete", "read", "write", "cas", CAS_CONFLICT})
    read_fs = frozenset({"get", "read", CAS_CONFLICT})

    def __init__(
        self,
        missing: Any = None,
        observed: frozenset[Any] | None = None,
        droppable_puts: bool = False,
        observed_texts: tuple[str, ...] = (),
    ) -> None:
        self.missing = missing
        #: Values (and prefixes of values) some get returns or some cas
        #: expects; others are merged into one unobserved state per kind.
        self.observed = observed
        #: Whether :meth:`irrelevant` may drop unknown puts (see there).
        self.droppable_puts = droppable_puts
        #: The observed strings, to look for appended pieces in.
        self.observed_texts = observed_texts

    def _canon(self, value: Any) -> Any:
        observed = self.observed
        if observed is None or value is None or value in observed:
            return value
        return _unobserved(value)

    def step(self, state: Any, op: OpLike) -> tuple[bool, Any]:
        f = op.f
        if f == "get" or f == "read":
            current = self.missing if state is None else state
            return current == op.value, state
        if f == "put" or f == "write":
            return True, self._canon(op.value)
        if f == "append":
            value = op.value
            if isinstance(value, str):
                if state is None:
                    return True, self._canon(value)
                if state is UNOBSERVED_STR:
                    return True, state  # a longer unobserved string stays unobserved
                if not isinstance(state, str):
                    return False, state
                return True, self._canon(state + value)
            if state is None:
                return True, self._canon((value,))
            if state is UNOBSERVED_LIST:
                return True, state
            if not isinstance(state, tuple):
                return False, state
            return True, self._canon((*state, value))
        if f == "delete":
            return True, None
        if f == "cas":
            expected, new = op.value
            if self._holds(state, expected):
                return True, self._canon(new)
            return False, state
        if f == CAS_CONFLICT:
            expected, reported = op.value
            return _conflict_fits(state, self._holds(state, expected), reported), state
        raise ValueError(f"kv model has no function {f!r}")

    def _holds(self, state: Any, expected: Any) -> bool:
        """A cas's condition: expecting nil means the key is absent."""
        current = self.missing if state is None and expected is not None else state
        return bool(current == expected)

    def describe(self, state: Any) -> str:
        return "(absent)" if state is None else repr(state)

    def read_reachable(self, state: Any, read: OpLike, changers: Sequence[OpLike]) -> bool:
        """Whatever the order, the value ends as the last reset plus appends.

        A reset is the current state, a put/write, a delete or a cas's new
        value; after the last one only appends remain.  So the value read
        must equal a reset or extend one by a concatenation of appended
        values (each piece may be counted more than once: a safe
        over-approximation that keeps the test linear).
        """
        if read.f == CAS_CONFLICT:
            return True
        target = read.value
        bases: list[Any] = [state]
        pieces: set[Any] = set()
        for op in changers:
            f = op.f
            if f == "append":
                pieces.add(op.value)
            elif f == "put" or f == "write":
                bases.append(op.value)
            elif f == "delete":
                bases.append(None)
            elif f == "cas":
                bases.append(op.value[1])
        missing = self.missing
        for base in bases:
            if (missing if base is None else base) == target:
                return True
            if pieces and _extends(base, target, pieces):
                return True
        return False

    def specialize(self, ops: Sequence[OpLike]) -> Model:
        observed: set[Any] = set()
        for op in ops:
            if op.f == "get" or op.f == "read":
                observed.update(_prefixes(op.value))
            elif op.f == "cas":
                observed.update(_prefixes(op.value[0]))
        claimed, open_claims = _conflict_observed(ops)
        for value in claimed:
            observed.update(_prefixes(value))
        texts = tuple(v for v in observed if isinstance(v, str))
        droppable = _strings_only(ops) and not open_claims
        return KvModel(self.missing, frozenset(observed), droppable, texts)

    def symmetry_class(self, op: OpLike) -> Hashable:
        """Puts (and cas with one expected value) of values nobody tells apart
        all lead to the same merged state: one class."""
        if op.f in ("put", "write"):
            return ("put", self._canon(op.value))
        if op.f == "cas":
            expected, new = op.value
            return ("cas", expected, self._canon(new))
        return (op.f, op.value)

    def irrelevant(self, op: OpLike) -> bool:
        """An unknown put, cas or append whose result nobody can ever see.

        That is a put (or cas) of a value no get returns, no cas expects and
        nothing appended to it could become, or an append of a string that
        occurs in no value read or expected.  After such an operation only
        appends and resets can succeed until the next reset, so it can be left
        out provided those appends succeed on whatever value was there
        instead: guaranteed when every value of the key is a string (or the
        key has no appends), and no Conflict reported no state (any value but
        its expected one lets such a Conflict fit).
        """
        if self.observed is None or not self.droppable_puts:
            return False
        if op.f == "put" or op.f == "write":
            new = op.value
        elif op.f == "cas":
            new = op.value[1]
        elif op.f == "append" and isinstance(op.value, str):
            return not any(op.value in text for text in self.observed_texts)
        else:
            return False
        return new is not None and new not in self.observed

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, KvModel)
            and other.missing == self.missing
            and other.observed == self.observed
            and other.droppable_puts == self.droppable_puts
        )

    def __hash__(self) -> int:
        return hash((KvModel, self.missing, self.observed, self.droppable_puts))

    def __repr__(self) -> str:
        return f"KvModel(missing={self.missing!r})"


def _strings_only(ops: Sequence[OpLike]) -> bool:
    """True if no append exists or every value a state can take is a string."""
    if not any(op.f == "append" for op in ops):
        return True
    for op in ops:
        if op.f in ("put", "write", "append"):
            value = op.value
        elif op.f == "cas":
            value = op.value[1]
        else:
            continue
        if not isinstance(value, str):
            return False
    return True


def _extends(base: Any, target: Any, pieces: set[Any]) -> bool:
    """Could appending some of ``pieces`` to ``base`` give ``target``?

    ``None`` (absent) is the empty string or list.  For strings this is a
    small dynamic programme over positions of the remainder.
    """
    if isinstance(target, str):
        if base is None:
            base = ""
        if not isinstance(base, str) or not target.startswith(base):
            return False
        rest = target[len(base) :]
        words = [p for p in pieces if isinstance(p, str) and p]
        reach = [False] * (len(rest) + 1)
        reach[0] = True
        for i in range(len(rest)):
            if reach[i]:
                for word in words:
                    if rest.startswith(word, i):
                        reach[i + len(word)] = True
        return reach[-1]
    if isinstance(target, tuple):
        if base is None:
            base = ()
        if not isinstance(base, tuple) or target[: len(base)] != base:
            return False
        return all(item in pieces for item in target[len(base) :])
    return False


REGISTER_FS = RegisterModel.fs


def model_for_fs(fs: set[str] | frozenset[str]) -> Model:
    """The default model for a history using functions ``fs``.

    A register when only read/write/cas appear, else the key-value model.
    """
    if fs <= REGISTER_FS:
        return RegisterModel()
    return KvModel()
