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
    (GOOD_DEV + "queues = 0\n", "device[0].queues", "between 1 and 16"),
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
