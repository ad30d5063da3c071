"""Serializable ("local") reads of the etcd store, tested directly on the store: they answer from
the connected member's own state, even when that member has lost its quorum, where a
linearizable read (the default) refuses to answer rather than risk a stale value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from kvserver.domain import PutOp, PutResult, StorageFailure, wall_clock_ms
from kvserver.store.etcd import EtcdStore

if TYPE_CHECKING:
    from tests.cluster.conftest import ClusterFactory

pytestmark = pytest.mark.slow


async def test_serializable_reads_answer_without_quorum(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(3, members_only=True)
    local = cluster.members[2]
    others = [member.endpoint for member in cluster.members[:2]]
    store = await EtcdStore.open([local.endpoint, *others], operation_timeout_s=3.0, request_timeout_s=1.0)
    try:
        written = await store.write(PutOp("k", b"v"))
        assert isinstance(written, PutResult)
        for serializable in (False, True):
            revision, entry = await store.get("k", wall_clock_ms(), serializable=serializable)
            assert entry == written.entry
            assert revision >= written.revision

        # Cut the local member off: kill the two others.
        for index in (0, 1):
            cluster.kill_member(index)
        with pytest.raises(StorageFailure):
            await store.get("k", wall_clock_ms())
        with pytest.raises(StorageFailure):  # the server's health check: NOT_SERVING
            await store.check()
        revision, entry = await store.get("k", wall_clock_ms(), serializable=True)
        assert entry == written.entry
        assert revision == written.revision
        assert (await store.get("absent", wall_clock_ms(), serializable=True))[1] is None
    finally:
        await store.close()
