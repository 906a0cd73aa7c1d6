"""The cluster catalog: a worker publishes what its registry found; API nodes resolve names against
the union of the live workers' catalogs (real Redis, real registry scans of tiny models)."""
from __future__ import annotations

import time

import pytest

from diffusionapi.jobs.backends.celery.catalog import CatalogRegistry, catalog_of
from diffusionapi.jobs.backends.celery.state import RedisJobState
from diffusionapi.errors import BackendUnavailable
from diffusionapi.registry import Registry, UnknownName
from tests.cluster_fixtures import redis_server  # noqa: F401 - fixture
from tests.conftest import make_settings

pytestmark = pytest.mark.broker


@pytest.fixture
def state(redis_server):  # noqa: F811
    s = RedisJobState(redis_server.url)
    s.r.flushdb()
    yield s
    s.close()


def test_union_of_live_workers_resolves_names_and_names_what_is_missing(state, model_store, tmp_path):
    settings = make_settings(model_store, tmp_path, worker_heartbeat_sec=0.2)
    local = Registry(settings)
    models = {m.name: m for m in local.models()}
    cat_sd15 = catalog_of(local, [models["tiny-sd15"]])
    assert cat_sd15["models"] == [{"name": "tiny-sd15", "label": "Tiny SD", "family": "sd15", "format": "diffusers",
                                   "prediction": "epsilon", "ztsnr": False,
                                   "path": cat_sd15["models"][0]["path"],
                                   "hash": cat_sd15["models"][0]["sha256"][:10],
                                   "sha256": cat_sd15["models"][0]["sha256"]}]
    assert len(cat_sd15["models"][0]["sha256"]) == 64  # the worker hashes the folder it has
    state.heartbeat("a", {"device": "cuda:0"}, ttl=30, catalog=cat_sd15)
    state.heartbeat("b", {"device": "cuda:1"}, ttl=30, catalog=catalog_of(local, [models["tiny-sdxl"]]))
    api = CatalogRegistry(settings, state, refresh_sec=0)
    assert [m.name for m in api.models()] == ["tiny-sd15", "tiny-sdxl"]
    assert api.resolve_model("Tiny XL").name == "tiny-sdxl"  # labels resolve as on one box
    assert [u.name for u in api.upscalers()][:1] == ["Latent"]
    assert [(e.name, e.family, e.vectors) for e in api.embeddings()] == \
        [(e.name, e.family, e.vectors) for e in sorted(local.embeddings(), key=lambda e: e.name.casefold())]
    time.sleep(0.7)  # both stop beating: dead after 3 heartbeats
    state.heartbeat("a", {"device": "cuda:0"}, ttl=30)
    assert [m.name for m in api.models()] == ["tiny-sd15"]
    with pytest.raises(UnknownName, match="no live worker has model 'tiny-sdxl'"):
        api.resolve_model("tiny-sdxl")
    time.sleep(0.7)  # none left: a 503 to retry, not a 422 about the name (#32: a failover's moment)
    with pytest.raises(BackendUnavailable, match="no live worker in the cluster") as e:
        api.resolve_model("tiny-sd15")
    assert e.value.status == 503 and e.value.headers["Retry-After"]


def test_an_api_node_that_started_before_any_worker_sees_the_first_one_at_once(state, model_store, tmp_path):
    # A node starting first views an empty cluster; that view is not kept for refresh_sec, so the
    # first worker's models are usable on the next request (a fixture race in session 5's runs).
    settings = make_settings(model_store, tmp_path, worker_heartbeat_sec=0.2)
    api = CatalogRegistry(settings, state, refresh_sec=3600)
    with pytest.raises(BackendUnavailable):
        api.resolve_model("tiny-sd15")
    local = Registry(settings)
    state.heartbeat("w", {"device": "cpu"}, ttl=30,
                    catalog=catalog_of(local, [m for m in local.models() if m.name == "tiny-sd15"]))
    assert api.resolve_model("tiny-sd15").name == "tiny-sd15"


def test_a_beat_without_a_catalog_keeps_the_published_one_alive(state, model_store, tmp_path):
    # Workers rebuild their catalog on a thread of its own, every 30 s; beats in between send none.
    local = Registry(make_settings(model_store, tmp_path))
    assert state.heartbeat("w", {}, ttl=2, catalog=catalog_of(local, local.models()[:1]))
    assert state.heartbeat("w", {}, ttl=30)
    assert state.r.ttl("dapi:catalog:w") > 2


def test_a_worker_sends_its_catalog_again_when_redis_lost_it(state, model_store, tmp_path):
    # A restart from an AOF without the last second, or a failover to a replica that missed it.
    from types import SimpleNamespace

    from diffusionapi.jobs.backends.celery.worker import ClusterWorker

    local = Registry(make_settings(model_store, tmp_path))
    w = SimpleNamespace(state=state, name="w", hb=0.5, lease_sec=1.5, current_job=None, info=lambda: {},
                        _catalog_new=catalog_of(local, local.models()[:1]), _catalog_sent=None)
    ClusterWorker.beat(w)
    published = state.r.get("dapi:catalog:w")
    assert published and w._catalog_new is None
    state.r.delete("dapi:catalog:w")
    ClusterWorker.beat(w)  # the beat learns it is gone...
    ClusterWorker.beat(w)  # ...and the next one sends it again
    assert state.r.get("dapi:catalog:w") == published
