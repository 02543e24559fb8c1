"""The loopback GCS server the storage tests use: gcsfs, etils.epath and tensorstore all reach it."""

import json

import numpy as np
import tensorstore as ts
from etils import epath

from gcs_server import gcs_bucket, gcs_server, http  # noqa: F401  (pytest fixtures)


def test_epath_and_tensorstore_share_one_bucket(gcs_bucket):
  path = epath.Path(gcs_bucket) / "runs" / "a" / "config.json"
  path.write_text(json.dumps({"x": 1}))
  assert json.loads(path.read_text()) == {"x": 1}
  arr = ts.open({"driver": "zarr", "kvstore": f"{gcs_bucket}/arr", "metadata": {
      "shape": [3], "chunks": [3], "dtype": "<i4"}}, create=True).result()
  arr.write(np.array([4, 5, 6], np.int32)).result()
  # tensorstore wrote objects that gcsfs lists, and reads back what it wrote
  assert "arr" in [p.name for p in epath.Path(gcs_bucket).iterdir()]
  np.testing.assert_array_equal(ts.open({"driver": "zarr", "kvstore": f"{gcs_bucket}/arr"}).result().read().result(),
                                [4, 5, 6])


def test_each_test_gets_an_empty_bucket(gcs_bucket, gcs_server):
  status, body = http("GET", f"{gcs_server.url}/storage/v1/b/{gcs_bucket[5:]}/o")
  assert status == 200 and not json.loads(body).get("items")
