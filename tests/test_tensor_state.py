"""nos.tensor_state: the pickle-free format of searcher checkpoints and transfer snapshots.

What goes in comes back exactly (key types, tuples, inf and nan, every dtype, bit for bit); state
dicts of torch's modules, optimizers and generators load from it; and anything else (damaged,
truncated, hostile or torch.save's bytes) is a TensorStateError, never another exception and never
an unpickling.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
from collections import OrderedDict

import pytest
import torch
from torch import nn

from nos.tensor_state import DTYPES, MAGIC, PickledState, TensorStateError, from_bytes, to_bytes


def same(a, b) -> bool:
    """Equal in value and in type all the way down (a tensor: dtype, shape and bytes; nan equals nan)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bytes_of(a), _bytes_of(b)))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) and all(
            same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def blob(root, payload: bytes = b"", **header) -> bytes:
    """A blob of this format with the given header root and tensor bytes (to forge bad ones)."""
    text = json.dumps({"byteorder": "little", "root": root, **header}).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + payload


def tensor_node(dtype="float32", shape=(2,), offset=0, length=8):
    return {"tensor": {"dtype": dtype, "shape": list(shape), "offset": offset, "length": length}}


# -- what goes in comes back ----------------------------------------------------------------------------------

def test_plain_values_come_back_with_their_exact_types():
    state = {"name": "ppo", 3: [1, -0.0, 2.5, math.inf, -math.inf, math.nan, None, True, False],
             "nested": {"tuple": (1, (2, "x")), "list": [[], {}, ()], 0: {1: {2: "deep"}}},
             "big": 2 ** 80, "text": "ünïcode \n \x00 \"quoted\"", "": 0, -1: "negative key"}
    back = from_bytes(to_bytes(state))
    assert same(back, state)
    assert list(back) == list(state)
    assert type(back["nested"]["tuple"][1]) is tuple


def test_an_ordered_dict_comes_back_as_a_plain_dict_in_the_same_order():
    state = OrderedDict([("b", 1), ("a", 2)])
    back = from_bytes(to_bytes(state))
    assert type(back) is dict and list(back.items()) == [("b", 1), ("a", 2)]


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_comes_back_bit_for_bit(name):
    dtype = DTYPES[name]
    if dtype == torch.bool:
        tensor = torch.tensor([[True, False, True], [False, False, True]])
    else:   # any bit pattern of the dtype, nan and subnormal ones included
        raw = torch.randint(0, 256, (2, 3 * dtype.itemsize), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(1))
        tensor = raw.view(dtype)
    back = from_bytes(to_bytes({"t": tensor}))["t"]
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(_bytes_of(back), _bytes_of(tensor))


def test_odd_tensors_come_back_as_plain_contiguous_copies():
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {
        "zero_dim": torch.tensor(3.5), "empty": torch.empty(0, 5), "transposed": base.t(), "strided": base[::2, 1::3],
        "conjugated": torch.complex(torch.ones(3), torch.arange(3.0)).conj(), "negated": base.neg()._neg_view(),
        "expanded": torch.tensor([1, 2]).expand(3, 2), "bfloat16": torch.randn(4, dtype=torch.bfloat16),
        "rng": torch.get_rng_state(), "parameter": nn.Parameter(torch.ones(2)),
    }
    back = from_bytes(to_bytes(tensors))
    for name, tensor in tensors.items():
        got = back[name]
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, name
        assert torch.equal(got, tensor.detach().resolve_conj().resolve_neg()), name
        assert got.is_contiguous() and type(got) is torch.Tensor and not got.requires_grad, name
        # its own storage, just its size: no view of the blob (or of a buffer shared with the others)
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size(), name


def test_tensors_read_back_are_independent_of_the_blob_and_of_each_other():
    data = to_bytes({"a": torch.zeros(3), "b": torch.zeros(3)})
    first = from_bytes(data)
    first["a"] += 1
    assert torch.equal(first["b"], torch.zeros(3))
    assert torch.equal(from_bytes(data)["a"], torch.zeros(3))


def test_state_dicts_of_modules_optimizers_and_generators_load_and_continue_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LSTM(8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 4)

    def step(m, opt):
        opt.zero_grad()
        out = m[2](m[1](m[0](x)))[0].square().mean()
        out.backward()
        opt.step()

    step(model, optimizer)
    generator = torch.Generator().manual_seed(5)
    saved = to_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "gen": generator.get_state()})
    step(model, optimizer)
    expected = generator.get_state(), torch.randn(3, generator=generator)

    state = from_bytes(saved)
    assert list(state["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5, 6, 7]   # int keys stay ints
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    torch.manual_seed(1)
    copy = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LSTM(8, 8))
    copy_optimizer = torch.optim.Adam(copy.parameters(), lr=1e-2)
    copy.load_state_dict(state["model"])
    copy_optimizer.load_state_dict(state["optimizer"])
    step(copy, copy_optimizer)
    for a, b in zip(model.state_dict().values(), copy.state_dict().values()):
        assert torch.equal(a, b)
    restored = torch.Generator()
    restored.set_state(state["gen"])
    assert torch.equal(restored.get_state(), expected[0])
    assert torch.equal(torch.randn(3, generator=restored), expected[1])


@pytest.mark.parametrize(("value", "message"), [
    ({"x": object()}, r"state\['x'\] is a builtins.object"),
    ({"x": {1, 2}}, "builtins.set"),
    ({1.5: "float key"}, "keys must be str or int"),
    ({True: "bool key"}, "keys must be str or int"),
    ({"x": [torch.eye(2).to_sparse()]}, r"state\['x'\]\[0\] is a torch.sparse_coo"),
    ({"x": b"bytes"}, "builtins.bytes"),
])
def test_what_cannot_be_stored_is_a_type_error_that_says_where(value, message):
    with pytest.raises(TypeError, match=message):
        to_bytes(value)


# -- what is refused ---------------------------------------------------------------------------------------------

def test_torch_saves_zip_is_refused_without_being_unpickled(monkeypatch):
    buffer = io.BytesIO()
    torch.save({"generator": torch.get_rng_state()}, buffer)

    def never(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr("pickle.loads", never)
    monkeypatch.setattr("pickle.Unpickler", never)
    with pytest.raises(PickledState, match="written by torch.save"):
        from_bytes(buffer.getvalue())


@pytest.mark.parametrize(("data", "message"), [
    (b"", "does not start with"),
    (b"\x80\x04\x95 a pickle", "does not start with"),
    (b"NOSTATE9" + bytes(16), "version b'9' of the format, written by a newer nos"),
    (MAGIC + b"\x01", "cut off before its header"),
    (MAGIC + struct.pack("<Q", 1000) + b"{}", "runs past its end"),
    (MAGIC + struct.pack("<Q", 3) + b"{x}", "not JSON"),
    (MAGIC + struct.pack("<Q", 2) + b"\xff\xfe", "not JSON"),
    (MAGIC + struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (MAGIC + struct.pack("<Q", 2) + b"{}", "holds nothing, not byteorder and root"),
    (blob(1, byteorder="big"), "byte order is 'big', this machine's is 'little'"),
    (blob(None, byteorder=None), "byte order is None"),
    (MAGIC + struct.pack("<Q", 22) + b'{"byteorder":"little"}', "holds byteorder, not byteorder and root"),
    (blob(1, extra=2), "holds byteorder, extra, root"),
    (blob([1, 2]), "neither a value nor a one-key object"),
    (blob({"list": [], "tuple": []}), "neither a value nor a one-key object"),
    (blob({"set": [1]}), "unknown kind 'set'"),
    (blob({"list": {"a": 1}}), "must hold a JSON array"),
    (blob({"dict": {"a": 1}}), "JSON array of \\[key, value\\] pairs"),
    (blob({"dict": [["a"]]}), "not a \\[key, value\\] pair"),
    (blob({"dict": [[1.5, 1]]}), "keys are strings or integers"),
    (blob({"dict": [[True, 1]]}), "keys are strings or integers"),
    (blob({"dict": [["a", 1], ["a", 2]]}), "the key 'a' twice"),
    (blob(tensor_node(dtype="object"), bytes(8)), "dtype 'object'"),
    (blob(tensor_node(dtype=["float32"]), bytes(8)), "dtype"),
    (blob({"tensor": {"dtype": "float32", "shape": [2], "offset": 0}}, bytes(8)), "exactly dtype, shape"),
    (blob(tensor_node(shape=(-2,), length=-8), bytes(8)), "not a list of sizes"),
    (blob(tensor_node(shape="2"), bytes(8)), "not a list of sizes"),
    (blob(tensor_node(shape=(True,)), bytes(8)), "not a list of sizes"),
    (blob(tensor_node(offset=4), bytes(8)), "not within the 8 bytes"),
    (blob(tensor_node(offset=-4), bytes(8)), "not within"),
    (blob(tensor_node(offset=2 ** 70), bytes(8)), "not within"),
    (blob(tensor_node(offset=1.0), bytes(8)), "not within"),
    (blob(tensor_node(length=12), bytes(16)), "which is not 12 bytes"),
    (blob(tensor_node(shape=(2 ** 61, 2 ** 61), length=8), bytes(8)), "which is not 8 bytes"),
    # an empty tensor with a size past 2**63: the byte count holds (0), then torch's reshape overflowed
    (blob(tensor_node(shape=(0, 2 ** 70), length=0), bytes(8)), "not a list of sizes"),
    (blob(tensor_node(shape=(0, 2 ** 63), length=0), bytes(8)), "not a list of sizes"),
    (blob(tensor_node(dtype="bool", shape=(2,), length=2), b"\x01\x07"), "bytes other than 0 and 1"),
    (blob({"list": [{"list": [{"tensor": 3}]}]}), r"state\[0\]\[0\]: a tensor is described"),
])
def test_a_bad_blob_is_one_clear_error(data, message):
    with pytest.raises(TensorStateError, match=message):
        from_bytes(data)


def test_nesting_past_the_limit_is_refused_both_ways():
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(TypeError, match="nested more than"):
        to_bytes(deep)
    node: dict = {"list": []}
    for _ in range(100):
        node = {"list": [node]}
    with pytest.raises(TensorStateError, match="nested more than"):
        from_bytes(blob(node))
    with pytest.raises(TensorStateError, match="not JSON"):   # deeper than json itself goes
        from_bytes(MAGIC + struct.pack("<Q", 200_002) + b"[" * 100_001 + b"]" * 100_001)


def test_every_truncation_and_many_corruptions_are_a_tensor_state_error_or_a_state():
    data = to_bytes({"gen": torch.get_rng_state()[:64], "w": torch.randn(3, 2), 0: {"step": 4, "betas": (0.9, 0.99)}})
    for cut in range(len(data)):
        try:
            from_bytes(data[:cut])
        except TensorStateError:
            pass
    rng = random.Random(0)
    for _ in range(2000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            from_bytes(bytes(damaged))
        except TensorStateError:
            pass


# -- what a hostile blob cannot make reading do --------------------------------------------------------------

def test_tensors_that_share_bytes_are_refused_before_they_add_up_past_the_blob():
    """Entries pointing at the same bytes, each copied, made a 1 MB blob allocate 1 GB (and a 3 MB one fail
    with torch's RuntimeError instead of a TensorStateError)."""
    aliased = blob({"list": [tensor_node(), tensor_node()]}, bytes(8))   # two entries, one tensor's bytes
    with pytest.raises(TensorStateError, match=r"state\[1\]'s bytes 0\+8 overlap another tensor's"):
        from_bytes(aliased)
    many = blob({"list": [tensor_node(shape=(256,), length=1024)] * 1000}, bytes(1024))   # 1 MB wanted of 1 kB
    with pytest.raises(TensorStateError, match="overlap"):
        from_bytes(many)


def test_tensors_that_overlap_in_part_are_refused():
    # within the payload in total (8 + 8 of 16 bytes), yet sharing 4 bytes
    data = blob({"dict": [["a", tensor_node(offset=0)], ["b", tensor_node(offset=4)]]}, bytes(16))
    with pytest.raises(TensorStateError, match=r"state\['b'\]'s bytes 4\+8 overlap those of state\['a'\] \(0\+8\)"):
        from_bytes(data)


def test_what_to_bytes_writes_reads_back_however_its_tensors_are_shared():
    """to_bytes gives every entry bytes of its own (one tensor twice, views of one storage, empty tensors at
    the offset of the next), and disjoint tensors in another order than the header's read as well."""
    base = torch.arange(6.0)
    state = {"a": base, "again": base, "view": base[2:4], "empty": torch.empty(0), "after": torch.ones(2),
             "params": [base.view(2, 3), base.view(3, 2)], "zero_dim": torch.tensor(1.5)}
    assert same(from_bytes(to_bytes(state)), state)
    swapped = blob({"list": [tensor_node(offset=8), tensor_node(offset=0), tensor_node(shape=(0,), length=0,
                                                                                         offset=8)]},
                   struct.pack("<4f", 1, 2, 3, 4))
    assert [t.tolist() for t in from_bytes(swapped)] == [[3.0, 4.0], [1.0, 2.0], []]


def test_a_tensor_that_cannot_be_allocated_is_a_tensor_state_error(monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    from nos.tasks.transfer import SnapshotUnreadable, read_snapshot

    data = to_bytes({"w": torch.ones(2)})
    monkeypatch.setattr(torch.Tensor, "clone", out_of_memory)
    with pytest.raises(TensorStateError, match=r"state\['w'\]'s 8 bytes cannot be read into a tensor "
                                               r"\(RuntimeError: .*can't allocate memory\)"):
        from_bytes(data)
    # a transfer snapshot that cannot be allocated is dropped, as a damaged one is, not a traceback
    with pytest.raises(SnapshotUnreadable, match="the snapshot cannot be read: .*cannot be read into a tensor"):
        read_snapshot(data)


def test_a_key_past_the_limit_is_refused_both_ways():
    """A key of megabytes made every value under it copy it (below); no state nos writes has a key of 1,000."""
    with pytest.raises(TensorStateError, match=r"state\[0\] has a key of 1001 characters \('k{99}\.\.\. .*"
                                               r"keys are at most 1000"):
        from_bytes(blob({"list": [{"dict": [["k" * 1_001, 1]]}]}))
    assert same(from_bytes(to_bytes({"k" * 1_000: 1})), {"k" * 1_000: 1})
    with pytest.raises(TypeError, match="a key of 1001 characters; keys are at most 1000"):
        to_bytes({"k" * 1_001: 1})


def test_a_header_of_more_values_than_any_state_holds_is_refused(monkeypatch):
    """A 10 MB header of small values: refused after reading a million of them, not decoded for minutes."""
    with pytest.raises(TensorStateError, match="it holds more than 1000000 values"):
        from_bytes(blob({"list": [0] * 5_000_000}))
    monkeypatch.setattr("nos.tensor_state.MAX_NODES", 10)
    assert from_bytes(to_bytes([0] * 9)) == [0] * 9   # ten values, the list's own included
    with pytest.raises(TypeError, match="more than 10 values"):
        to_bytes([0] * 10)   # one value too many: it could not be read back


def test_an_error_names_its_path_with_each_key_clipped():
    """Every value copied its path, so reading took time quadratic in the header (a key could be megabytes
    long, refused now); the path is formatted only for an error, each key clipped to stay readable."""
    with pytest.raises(TensorStateError, match=r"^state\['k{99}\.\.\. \(1002 characters\)\]\[0\]: a list must hold"):
        from_bytes(blob({"dict": [["k" * 1_000, {"list": [{"list": 5}]}]]}))
