"""`python -m xmr.perf.served_overhead`: each variant is the built repository with exactly its edits, and
every variant's configuration still parses as Triton's `ModelConfig`."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from xmr.perf.served_overhead import VARIANTS, Variant, make_variant


def config(repository, model: str):
    text = (repository / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_a_variant_edits_queue_delay_instances_and_threads_only(tiny_repository, tmp_path):
    variant = Variant(delay_us=250, instances={"text_search": 3}, threads={"text_search": 2})
    out = make_variant(tiny_repository, tmp_path / "v", variant)
    edited, base = config(out, "text_search"), config(tiny_repository, "text_search")
    assert edited.dynamic_batching.max_queue_delay_microseconds == 250
    assert [g.count for g in edited.instance_group] == [3]
    assert edited.parameters["threads"].string_value == "2"
    # everything else as built: I/O, batch size, the other parameters
    for field in ("input", "output", "max_batch_size"):
        assert getattr(edited, field) == getattr(base, field)
    assert {k: v.string_value for k, v in edited.parameters.items() if k != "threads"} == {
        k: v.string_value for k, v in base.parameters.items() if k != "threads"
    }
    # models the variant does not name keep their instance counts and threads
    for model in ("text_encoder", "gallery_topk"):
        assert config(out, model).instance_group == config(tiny_repository, model).instance_group
        assert config(out, model).parameters == config(tiny_repository, model).parameters


def test_every_named_variant_builds_a_parsable_repository(tiny_repository, tmp_path):
    for name, variant in VARIANTS.items():
        out = make_variant(tiny_repository, tmp_path / name, variant)
        for path in out.glob("*/config.pbtxt"):
            config(out, path.parent.name)  # raises on a config Triton could not parse
        if variant.ensemble:
            assert config(out, "text_search").platform == "ensemble"


def test_batching_variants_set_preferred_sizes_or_remove_the_batcher(tiny_repository, tmp_path):
    assert list(config(tiny_repository, "text_search").dynamic_batching.preferred_batch_size) == [8]
    preferred = make_variant(tiny_repository, tmp_path / "p", Variant(preferred=(1, 8)))
    assert list(config(preferred, "text_search").dynamic_batching.preferred_batch_size) == [1, 8]
    unset = make_variant(tiny_repository, tmp_path / "u", Variant(preferred=()))
    assert not config(unset, "text_search").dynamic_batching.preferred_batch_size
    assert config(unset, "text_search").HasField("dynamic_batching")
    unbatched = make_variant(tiny_repository, tmp_path / "n", Variant(batching=False))
    for path in unbatched.glob("*/config.pbtxt"):
        cfg = config(unbatched, path.parent.name)
        assert not cfg.HasField("dynamic_batching")
        assert cfg.max_batch_size == config(tiny_repository, path.parent.name).max_batch_size
