"""Which S3 client the model fetcher uses: boto3 and obstore side by side on a real SeaweedFS.

Uploads a model-shaped prefix (FILES objects of FILE_MB each) to a SeaweedFS started here, then
downloads the whole prefix to disk ROUNDS times with each client, alternating, and prints one
JSON line: the best seconds of each and the ratio. Run: .venv/bin/python bench/s3_clients.py
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

FILES, FILE_MB, ROUNDS = 8, 32, 3


def boto3_download(env: dict, prefix: str, into: pathlib.Path) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="models", Prefix=prefix):
        for item in page.get("Contents", []):
            target = into / item["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("models", item["Key"], str(target), Config=TransferConfig(max_concurrency=4))


def obstore_download(env: dict, prefix: str, into: pathlib.Path) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store("models", endpoint=env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                    secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"],
                    client_options={"allow_http": True})

    async def main() -> None:
        async def one(key: str) -> None:
            target = into / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            result = await obstore.get_async(store, key)
            with open(target, "wb") as out:  # noqa: ASYNC230 - page-cache writes, the disk work boto3 does too
                async for chunk in result.stream():
                    out.write(chunk)
        keys = [item["path"] for batch in obstore.list(store, prefix=prefix) for item in batch]
        await asyncio.gather(*(one(key) for key in keys))
    asyncio.run(main())


def main() -> None:
    import boto3
    from seaweedfs_server import SeaweedS3

    server = SeaweedS3().start()
    try:
        env = server.environment()
        client = server.client(boto3)
        client.create_bucket(Bucket="models")
        for index in range(FILES):
            client.put_object(Bucket="models", Key=f"m/1/part{index}.bin", Body=os.urandom(FILE_MB << 20))
        best = {"boto3": float("inf"), "obstore": float("inf")}
        for _ in range(ROUNDS):
            for name, download in (("boto3", boto3_download), ("obstore", obstore_download)):
                with tempfile.TemporaryDirectory() as scratch:
                    start = time.perf_counter()
                    download(env, "m/", pathlib.Path(scratch))
                    best[name] = min(best[name], time.perf_counter() - start)
        print(json.dumps({"bench": "s3_clients", "bytes": FILES * (FILE_MB << 20), "boto3_s": round(best["boto3"], 3),
                          "obstore_s": round(best["obstore"], 3),
                          "boto3_over_obstore": round(best["boto3"] / best["obstore"], 2)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
