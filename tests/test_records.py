"""Every msgspec Struct keeps the field types msgspec decodes by, in the pure-Python build as in
the compiled one (a Struct defined in a module mypyc compiles would have its union and generic
field types erased to `type`, and decoding it would fail)."""

from __future__ import annotations

import importlib
import pkgutil

import msgspec

import forewarn
from forewarn import engine, model, records


def _structs() -> list[type[msgspec.Struct]]:
    found = []
    for info in pkgutil.iter_modules(forewarn.__path__):
        module = importlib.import_module(f"forewarn.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, msgspec.Struct)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return found


def test_every_struct_keeps_its_field_types():
    structs = _structs()
    assert records.Event in structs and len(structs) > 10
    erased = [
        f"{cls.__module__}.{cls.__name__}.{field.name}"
        for cls in structs
        for field in msgspec.structs.fields(cls)
        if field.type is type
    ]
    assert erased == []


def test_the_records_keep_their_usual_names():
    assert model.Event is records.Event
    assert model.SegmentMessage is records.SegmentMessage
    assert engine.Subject is records.Subject
    assert engine.Firing is records.Firing


def test_a_subject_round_trips_through_msgpack():
    subject = engine.Subject(5, traits=[None, 3], states=[None, [True, -1, 9, 9]], accounts=["a"])
    data = msgspec.msgpack.encode(subject)
    assert msgspec.msgpack.decode(data, type=engine.Subject) == subject
