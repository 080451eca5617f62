"""Bad machine configs each get a message that names the key and the problem."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kickcall.machine import ConfigError, default_config, load_config, parse_config

GOOD_DEV = '[[device]]\ntype = "virtio-blk"\n'

BAD = [
    ("[machine\nram = 1", "", "invalid TOML"),
    ('[machine]\nram = "lots"\n' + GOOD_DEV, "machine.ram", "is not a size"),
    ("[machine]\nram = 1024\n" + GOOD_DEV, "machine.ram", "between"),
    ('[machine]\nvcpus = "two"\n' + GOOD_DEV, "machine.vcpus", "must be an integer"),
    ("[machine]\nvcpus = 0\n" + GOOD_DEV, "machine.vcpus", "between 1 and 16"),
    ("[machine]\nvcpus = true\n" + GOOD_DEV, "machine.vcpus", "must be an integer"),
    ('[machine]\nguest = "vm"\n' + GOOD_DEV, "machine.guest", "one of 'process', 'thread'"),
    ("[machine]\ncolour = 1\n" + GOOD_DEV, "machine.colour", "unknown key"),
    ("[machine]\n", "device", "at least one"),
    ('device = "x"\n', "device", "array of tables"),
    ('[[device]]\ntype = "virtio-gpu"\n', "device[0].type", "one of 'virtio-blk', 'virtio-net'"),
    ("[[device]]\n", "device[0].type", "one of"),
    (GOOD_DEV + "queues = 0\n", "device[0].queues", "between 1 and 1024"),
    (GOOD_DEV + 'queues = "2"\n', "device[0].queues", "must be an integer"),
    (GOOD_DEV + "queue-size = 100\n", "device[0].queue-size", "power of two"),
    (GOOD_DEV + "ioeventfd = 1\n", "device[0].ioeventfd", "true or false"),
    (GOOD_DEV + 'size = "100000"\n', "device[0].size", "multiple of 4096"),
    (GOOD_DEV + 'size = "12345"\n', "device[0].size", "between"),
    (GOOD_DEV + 'backend = "loopback"\n', "device[0].backend", "one of 'file', 'vhost-user'"),
    (GOOD_DEV + 'backend = "vhost-user"\n', "device[0].socket", "needs the path of its socket"),
    (GOOD_DEV + 'backend = "vhost-user"\nsocket = "/' + "x" * 120 + '"\n', "device[0].socket", "108 bytes"),
    (GOOD_DEV + 'backend = "vhost-user"\nsocket = "/s"\nimage = "a.img"\n', "device[0].image", "unknown key"),
    (GOOD_DEV + 'backend = "vhost-user"\nsocket = "/s"\ninflight = "yes"\n', "device[0].inflight",
     "true or false"),
    (GOOD_DEV + 'aio = "io_uring"\n', "device[0].aio", "one of 'auto', 'threads', 'sync'"),
    (GOOD_DEV + 'id = "9lives"\n', "device[0].id", "must be a letter"),
    (GOOD_DEV + 'id = "a"\n' + GOOD_DEV + 'id = "a"\n', "device[1].id", "duplicate"),
    (GOOD_DEV + "slot = 1\n" + GOOD_DEV + "slot = 1\n", "device[1].slot", "already used"),
    (GOOD_DEV + "slot = 40\n", "device[0].slot", "between 1 and 31"),
    (GOOD_DEV + 'serial = "' + "x" * 21 + '"\n', "device[0].serial", "at most 20"),
    ('[[device]]\ntype = "virtio-net"\nbackend = "tap"\n', "device[0].backend", "one of"),
    ('[[device]]\ntype = "virtio-net"\nqueue-pairs = 9\n', "device[0].queue-pairs", "between 1 and 8"),
    (GOOD_DEV + "[workload.blk]\ndepth = 0\n", "workload.blk.depth", "between"),
    (GOOD_DEV + "[workload.blk]\nblock-size = 1000\n", "workload.blk.block-size", "multiple of 512"),
    (GOOD_DEV + "[workload.blk]\nread-ratio = 2\n", "workload.blk.read-ratio", "between"),
    (GOOD_DEV + "[workload.blk]\nfast = true\n", "workload.blk.fast", "unknown key"),
    (GOOD_DEV + "[workload.net]\nmin-payload = 900\nmax-payload = 100\n", "workload.net.min-payload",
     "must not exceed"),
    (GOOD_DEV + "[workload]\ndisk = 1\n", "workload.disk", "unknown key"),
    (GOOD_DEV + "[extra]\n", "extra", "unknown key"),
]


@pytest.mark.parametrize("text,key,problem", BAD, ids=[b[1] or "toml" for b in BAD])
def test_bad_config_names_the_key_and_the_problem(text, key, problem):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "bad.toml")
    e = ei.value
    assert e.key == key
    assert problem in str(e)
    assert str(e).startswith("bad.toml: ")


def test_default_config_is_one_blk_and_one_net():
    cfg = default_config()
    assert [d.type for d in cfg.devices] == ["virtio-blk", "virtio-net"]
    assert cfg.devices[0].image == ""  # a temporary image
    assert cfg.workload_blk and cfg.workload_net is not None


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.toml"))
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(p))


@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes_the_parser(text):
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml: ")


@given(st.dictionaries(st.sampled_from(["queues", "queue-size", "size", "ioeventfd", "irqfd", "msix", "aio",
                                        "read-only", "serial", "slot", "image", "id", "bogus"]),
                       st.one_of(st.integers(-5, 5000), st.booleans(), st.text(max_size=8),
                                 st.floats(allow_nan=False)), max_size=5))
def test_random_device_keys_are_accepted_or_named(keys):
    import tomllib  # noqa: F401  (the generator only produces TOML-representable values)

    lines = ['[[device]]', 'type = "virtio-blk"']
    for k, v in keys.items():
        if isinstance(v, bool):
            lit = "true" if v else "false"
        elif isinstance(v, str):
            lit = '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        else:
            lit = repr(v)
        lines.append(f"{k} = {lit}")
    try:
        parse_config("\n".join(lines) + "\n", "r.toml")
    except ConfigError as e:
        assert e.key == "" or e.key.startswith("device[0].") or e.key == "device[0]", e


# --- the reference `kickcall config` prints, and the key table it shares with the parser ---------

import dataclasses  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from kickcall.machine import config as mc  # noqa: E402
from kickcall.machine.config import MachineConfig, reference_toml  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _lit(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _table(header: str, kv: dict) -> str:
    return header + "\n" + "".join(f"{k} = {_lit(v)}\n" for k, v in kv.items())


# where a key lives: (table, the keys there, the base device when it is a [[device]] key)
CONTEXTS = [
    ("machine", mc.MACHINE_KEYS, None),
    ("device", mc.device_keys("virtio-blk", "file"), {"type": "virtio-blk"}),
    ("device", mc.device_keys("virtio-blk", "vhost-user"), {"type": "virtio-blk", "backend": "vhost-user",
                                                             "socket": "/s"}),
    ("device", mc.device_keys("virtio-net"), {"type": "virtio-net"}),
    ("device", mc.device_keys("vfio-user"), {"type": "vfio-user", "socket": "/s"}),
    ("device", mc.device_keys("pcie-root-port"), {"type": "pcie-root-port", "id": "rp1"}),
    ("workload.blk", mc.WORKLOAD_BLK_KEYS, None),
    ("workload.net", mc.WORKLOAD_NET_KEYS, None),
]
#: keys that only apply with others set
NEEDS = {("device", "function"): {"bus": "rp0"}, ("device", "allow-write"): {"image": "disk.img"},
         ("workload.net", "min-payload"): {"max-payload": 4000},
         ("workload.net", "max-payload"): {"min-payload": 16}}


def _config(table: str, base: dict | None, kv: dict) -> tuple[str, str]:
    """A config with key/values *kv* in *table*, and the key path they get (device[1]: a root port
    rp0 comes first, for bus = "rp0")."""
    text = _table("[[device]]", {"type": "pcie-root-port", "id": "rp0"})
    if table == "device":
        return text + _table("[[device]]", {**(base or {}), **kv}), "device[1]"
    if table == "machine":
        return _table("[machine]", kv) + text, "machine"
    return text + _table(f"[{table}]", kv), table


def _value(cfg: MachineConfig, table: str, name: str):
    attr = name.replace("-", "_")
    if table == "machine":
        return getattr(cfg, attr)
    if table == "device":
        return getattr(cfg.devices[1], attr)
    return (cfg.workload_blk if table == "workload.blk" else cfg.workload_net)[attr]


# a key the context's base sets (a vhost-user blk's backend) is probed in the context where it is free
PROBES = [(t, k, base) for t, keys, base in CONTEXTS for k in keys.values()
          if k.name not in ("type", "id") and (k.required or k.name not in (base or {}))]


def _probe_id(p) -> str:
    return f"{p[0]}:{(p[2] or {}).get('type', '')}{'/' + p[2]['backend'] if p[2] and 'backend' in p[2] else ''}:{p[1].name}"


@pytest.mark.parametrize("table,k,base", PROBES, ids=[_probe_id(p) for p in PROBES])
def test_every_key_takes_the_default_and_bounds_the_reference_states(table, k, base):
    """Parse each key absent (its stated default), at its stated minimum and maximum (accepted), one
    past each (refused, naming the key), each stated choice (accepted) and a value not among them."""
    needs = NEEDS.get((table, k.name), {})
    if k.default is not None and not k.required:
        text, _ = _config(table, base, needs)
        assert _value(parse_config(text), table, k.name) == k.default
    if k.lo is not None:
        past = 0.25 if k.kind == "float" else 1
        for good in (k.lo, k.hi):
            text, _ = _config(table, base, {**needs, k.name: good})
            assert _value(parse_config(text), table, k.name) == good
        for bad in (k.lo - past, k.hi + past):
            text, path = _config(table, base, {**needs, k.name: bad})
            with pytest.raises(ConfigError) as ei:
                parse_config(text)
            assert ei.value.key == f"{path}.{k.name}"
    if k.choices is not None:
        for c in k.choices:
            extra = {"socket": "/s"} if c == "vhost-user" else {}
            text, _ = _config(table, base, {**needs, **extra, k.name: c})
            assert _value(parse_config(text), table, k.name) == c
        text, path = _config(table, base, {**needs, k.name: "nosuch"})
        with pytest.raises(ConfigError, match="must be one of") as ei:
            parse_config(text)
        assert ei.value.key == f"{path}.{k.name}"
    if k.kind == "bool":
        for b in (True, False):
            text, _ = _config(table, base, {**needs, k.name: b})
            assert _value(parse_config(text), table, k.name) is b
    if k.required:
        text, path = _config(table, {kk: v for kk, v in (base or {}).items() if kk != k.name}, {})
        with pytest.raises(ConfigError) as ei:
            parse_config(text)
        assert ei.value.key == f"{path}.{k.name}"


def test_every_key_the_parser_reads_is_in_the_key_table(monkeypatch):
    """Spy on the parser's reads while it parses every context with every key set: each key it
    reads is in the table for that context, and a key outside the table is refused."""
    read: list[tuple[str, str]] = []
    real_get = mc._V.get

    def spy(self, k, default):
        read.append((self.path, k))
        return real_get(self, k, default)

    monkeypatch.setattr(mc._V, "get", spy)
    for table, keys, base in CONTEXTS:
        kv = {k.name: (k.example if k.example is not None else k.default) for k in keys.values()
              if k.name not in ("type", "id", "bus", "slot", "function") and k.default is not None or k.required}
        kv = {k: v for k, v in kv.items() if v is not None and k not in (base or {})}
        for bus in ({}, {"bus": "rp0", "function": 1}) if table == "device" and base and \
                base["type"] != "pcie-root-port" else ({},):
            read.clear()
            text, path = _config(table, base, {**kv, **bus})
            parse_config(text)
            mine = {k for p, k in read if p == path}
            assert mine <= set(keys), mine - set(keys)
            text, path = _config(table, base, {**kv, **bus, "x-not-a-key": 1})
            with pytest.raises(ConfigError, match="unknown key"):
                parse_config(text)


def test_every_config_field_is_a_key_in_the_table():
    """The parsed config's fields (MachineConfig, DeviceConfig, the workload dicts) each come from a
    key of the table: a field added to the parser without a key fails here."""
    every = {k.name.replace("-", "_") for _, keys, _ in CONTEXTS for k in keys.values()}
    machine = {f.name for f in dataclasses.fields(mc.MachineConfig)} - {"devices", "workload_blk",
                                                                          "workload_net", "source"}
    device = {f.name for f in dataclasses.fields(mc.DeviceConfig)}
    assert machine <= {k.replace("-", "_") for k in mc.MACHINE_KEYS}
    assert device <= every, device - every
    cfg = parse_config(reference_toml())
    assert set(cfg.workload_blk or {}) == {k.replace("-", "_") for k in mc.WORKLOAD_BLK_KEYS}
    assert set(cfg.workload_net or {}) == {k.replace("-", "_") for k in mc.WORKLOAD_NET_KEYS}


def _blocks(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    title = ""
    for line in text.splitlines():
        if line.startswith("# ---- "):
            title = line
            out[title] = ""
        elif title:
            out[title] += line + "\n"
    return out


def test_the_reference_parses_and_its_commented_blocks_do_too():
    cfg = parse_config(reference_toml(), "ref.toml")
    assert [(d.type, d.id) for d in cfg.devices] == [("virtio-blk", "blk0"), ("virtio-net", "net0"),
                                                      ("pcie-root-port", "rp0")]
    full = parse_config(reference_toml(all_blocks=True), "ref.toml")
    assert [(d.type, d.backend if d.type == "virtio-blk" else "") for d in full.devices] == [
        ("virtio-blk", "file"), ("virtio-net", ""), ("virtio-blk", "vhost-user"), ("pcie-root-port", ""),
        ("vfio-user", "")]
    assert full.workload_blk and full.workload_net


def test_the_reference_shows_every_key_with_its_default_and_range():
    """Each block of the reference has every key of its device type, with the line of type and
    range the key table states (which the probes above hold the parser to) and its default."""
    import re

    blocks = _blocks(reference_toml(all_blocks=True))
    want = {"[machine]": mc.MACHINE_KEYS, "[workload.blk]": mc.WORKLOAD_BLK_KEYS,
            "[workload.net]": mc.WORKLOAD_NET_KEYS,
            'backend = "file"': mc.device_keys("virtio-blk", "file"),
            'type = "virtio-net"': mc.device_keys("virtio-net"),
            'backend = "vhost-user"': mc.device_keys("virtio-blk", "vhost-user"),
            'type = "vfio-user"': mc.device_keys("vfio-user"),
            'type = "pcie-root-port"': mc.device_keys("pcie-root-port")}
    for marker, keys in want.items():
        body = [b for b in blocks.values() if re.search(rf"^{re.escape(marker)}$", b, re.M)]
        assert len(body) == 1, marker
        for k in keys.values():
            m = re.search(rf"^# {re.escape(k.describe())}; default {re.escape(k.default_text())}\n"
                          rf"(# )?{re.escape(k.name)} = ", body[0], re.M)
            assert m, (marker, k.name)
    assert "seed" in blocks[[t for t in blocks if "block workload" in t][0]]
    for name in ("ioeventfd", "irqfd", "msix", "queue-size", "slot", "seed", "stall-timeout", "bus",
                 "function", "aer", "hypervisor", "nr-pirqs", "max-irq-routes"):
        assert re.search(rf"^(# )?{name} = ", reference_toml(), re.M), name


def test_kickcall_config_prints_the_reference(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-m", "kickcall", "config"], capture_output=True, text=True,
                       timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_toml()
    p = tmp_path / "ref.toml"
    p.write_text(r.stdout)
    r = subprocess.run([sys.executable, "-m", "kickcall", "config", "--check", str(p)], capture_output=True,
                       text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
