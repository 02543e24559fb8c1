"""Leases on a real loopback GCS server and on a local disk: create-if-absent, heartbeats, expiry, takeover,
and several claimers at once of which exactly one wins."""

import json
import multiprocessing
import time

import pytest

from gcs_server import gcs_bucket, gcs_server, http  # noqa: F401  (pytest fixtures)
from jaxreplay.io.lease import Lease, LeaseHeld, read_holder


@pytest.fixture(params=["gs", "local"])
def lease_path(request, tmp_path):
  if request.param == "gs":
    return f"{request.getfixturevalue('gcs_bucket')}/runs/r1/lease.json"
  return str(tmp_path / "runs" / "r1" / "lease.json")


def test_the_server_checks_the_create_precondition_only_on_the_request_leases_use(gcs_bucket, gcs_server):
  """Why leases are created by multipart upload: this server accepts a second simple media upload with
  ifGenerationMatch=0 (an old bug), but refuses a second create made the way Lease makes it."""
  bucket = gcs_bucket[5:]
  media = f"{gcs_server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name=m&ifGenerationMatch=0"
  assert [http("POST", media, b"x")[0] for _ in range(2)] == [200, 200]  # not checked here
  first, second = Lease(f"{gcs_bucket}/lease.json"), Lease(f"{gcs_bucket}/lease.json")
  assert first.try_acquire()
  assert not second.try_acquire()  # the 412 of a second create
  status, body = http("GET", f"{gcs_server.url}/storage/v1/b/{bucket}/o/lease.json?alt=media")
  assert status == 200 and json.loads(body)["holder"] == first.holder


def test_a_live_lease_is_refused_with_its_holder_and_released_for_the_next(lease_path):
  a, b = Lease(lease_path, ttl_s=60), Lease(lease_path, ttl_s=60)
  a.acquire("run r1")
  with pytest.raises(LeaseHeld, match=r"^run r1 is held by .* \(pid \d+\) since .* UTC, last heartbeat \d+ s ago: "
                                      "wait for it to finish"):
    b.acquire("run r1")
  holder = read_holder(lease_path)
  assert holder.holder == a.holder and not holder.expired()
  assert a.heartbeat() and read_holder(lease_path).heartbeat >= holder.heartbeat
  a.release()
  assert read_holder(lease_path) is None
  assert b.try_acquire()


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(lease_path):
  old, new = Lease(lease_path, ttl_s=0.5), Lease(lease_path, ttl_s=0.5)
  assert old.try_acquire()
  assert not new.try_acquire()  # still live
  time.sleep(0.7)  # old's runner was killed: no heartbeat
  assert new.try_acquire()
  assert read_holder(lease_path).holder == new.holder
  assert not old.heartbeat()  # matched to the generation old wrote: refused, new's lease is intact
  old.release()  # releasing a lost lease deletes nothing
  assert read_holder(lease_path).holder == new.holder


def test_kept_alive_heartbeats_outlive_the_ttl(lease_path):
  a, b = Lease(lease_path, ttl_s=0.6), Lease(lease_path, ttl_s=0.6)
  with a.kept_alive():
    assert a.try_acquire()
    time.sleep(1.5)
    assert not b.try_acquire() and not a.lost.is_set()
  assert read_holder(lease_path) is None  # released at the end of the block


def _claim(path, ttl_s, start_at, out):
  time.sleep(max(0.0, start_at - time.time()))  # all processes ask at once
  lease = Lease(path, ttl_s=ttl_s)
  out.put((lease.try_acquire(), lease.holder))


def _race(path, n=4, ttl_s=60.0):
  ctx = multiprocessing.get_context("spawn")
  out = ctx.Queue()
  start_at = time.time() + 3.0  # after every spawned interpreter has imported jaxreplay
  procs = [ctx.Process(target=_claim, args=(path, ttl_s, start_at, out)) for _ in range(n)]
  for p in procs:
    p.start()
  results = [out.get(timeout=60) for _ in procs]
  for p in procs:
    p.join(timeout=30)
  return results


def test_of_several_claimers_at_once_exactly_one_wins(lease_path):
  results = _race(lease_path)
  winners = [h for won, h in results if won]
  assert len(winners) == 1 and read_holder(lease_path).holder == winners[0]


def test_of_several_takers_of_an_expired_lease_exactly_one_wins(lease_path):
  dead = Lease(lease_path, ttl_s=0.1)
  assert dead.try_acquire()
  time.sleep(0.2)
  results = _race(lease_path, ttl_s=60.0)
  winners = [h for won, h in results if won]
  assert len(winners) == 1 and read_holder(lease_path).holder == winners[0]


def _adopt_and_beat(token, out):
  lease = Lease.adopt(token)
  out.put((lease.heartbeat(), lease.holder))


def test_a_lease_handed_to_a_worker_process_is_held_and_kept_there(lease_path):
  """A sweep runner claims a run and starts a worker process that trains it: the worker adopts the lease."""
  runner = Lease(lease_path, ttl_s=60)
  assert runner.try_acquire()
  ctx = multiprocessing.get_context("spawn")
  out = ctx.Queue()
  p = ctx.Process(target=_adopt_and_beat, args=(runner.handoff(), out))
  p.start()
  beat, holder = out.get(timeout=60)
  p.join(timeout=30)
  assert beat and holder == runner.holder == read_holder(lease_path).holder
  assert not Lease(lease_path, ttl_s=60).try_acquire()
  assert not runner.heartbeat()  # the worker's heartbeat moved the generation on: the runner no longer holds it
