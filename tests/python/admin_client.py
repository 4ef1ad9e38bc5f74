"""Drives Sigil's admin API with grpcio, as an operator's script would: stubs generated from the
proto files with grpcio-tools, a channel to the admin Unix socket with grpcio's defaults (no
`:authority` override). Usage: admin_client.py PROTO_DIR SOCKET PARENT_ID COUNT

Creates one entry with CreateEntry, COUNT more with BatchCreateEntries (1 000 per call, one bad
entry among them), pages through ListEntries, asks CountEntries, and prints what it
saw as one JSON object."""

import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def stubs(proto_dir):
    out = tempfile.mkdtemp()
    protos = ["common.proto", "admin.proto"]
    status = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}"] + protos)
    if status != 0:
        sys.exit(f"protoc failed with {status}")
    sys.path.insert(0, out)
    import admin_pb2
    import admin_pb2_grpc
    import common_pb2

    return admin_pb2, admin_pb2_grpc, common_pb2


def main():
    proto_dir, socket, parent_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    admin, admin_grpc, common = stubs(proto_dir)
    channel = grpc.insecure_channel(f"unix:{os.path.abspath(socket)}")
    api = admin_grpc.AdminApiStub(channel)

    def entry(name, uid):
        return common.Entry(
            spiffe_id=f"spiffe://example.org/py/{name}",
            parent_id=parent_id,
            selectors=[common.Selector(type="unix", value=f"uid:{uid}")],
        )

    single = api.CreateEntry(admin.CreateEntryRequest(entry=entry("single", 1)))
    entries = [entry(f"batch-{n}", 10_000 + n) for n in range(count)]
    entries.insert(1, common.Entry(spiffe_id="not a spiffe id", parent_id=parent_id))
    results = []
    for start in range(0, len(entries), 1000):
        batch = entries[start:start + 1000]
        results.extend(api.BatchCreateEntries(admin.BatchCreateEntriesRequest(entries=batch)).results)

    listed, pages, token = [], 0, ""
    while True:
        page = api.ListEntries(admin.ListEntriesRequest(page_size=700, page_token=token))
        pages += 1
        listed.extend(e.id for e in page.entries)
        token = page.next_page_token
        if not token:
            break

    try:
        api.ListEntries(admin.ListEntriesRequest(page_size=1_000_000))
        too_big = "accepted"
    except grpc.RpcError as e:
        too_big = f"{e.code().name}: {e.details()}"

    print(json.dumps({
        "single_id": single.id,
        "batch_ok": sum(1 for r in results if r.code == 0),
        "batch_failed": [r.message for r in results if r.code != 0],
        "listed": len(listed),
        "listed_sorted_unique": listed == sorted(set(listed)),
        "pages": pages,
        "count": api.CountEntries(admin.CountEntriesRequest()).count,
        "too_big_page": too_big,
    }))


if __name__ == "__main__":
    main()
