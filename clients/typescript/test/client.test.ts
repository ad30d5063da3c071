// The TypeScript client against a real kv-server (started here, stopped by PID in `after`).
// Run with `npm test` (tsc, then `node --test`); tests/polyglot/test_typescript.py runs it in CI.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createClient } from "@connectrpc/connect";

import { Code, ConnectError, KvClient, WatchCanceledError, type KvEvent, type WatchBatch } from "../src/index.js";
import { Event_Type, KeyValue, PutRequestSchema, WatchCancel_Reason } from "../src/gen/kv/v1/kv_pb.js";
import { startServer, stopServer, type RunningServer } from "./server.js";

const TEST_TIMEOUT_MS = 20_000;

let server: RunningServer | undefined;
let kv: KvClient;

before(async () => {
  server = await startServer();
  kv = KvClient.connect(server.address);
});

after(async () => {
  kv?.close();
  await stopServer(server);
});

async function rejectsWith(promise: Promise<unknown>, code: Code): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.equal(ConnectError.from(err).code, code, String(err));
    return true;
  });
}

/** Read batches until `count` events arrived (progress and initial-state batches are skipped). */
async function nextEvents(batches: AsyncIterator<WatchBatch>, count: number): Promise<KvEvent[]> {
  const events: KvEvent[] = [];
  while (events.length < count) {
    const next = await batches.next();
    assert.ok(!next.done, `the watch ended after ${events.length} of ${count} events`);
    events.push(...next.value.events);
  }
  assert.equal(events.length, count);
  return events;
}

describe("kv.v1.KeyValue from TypeScript", { timeout: TEST_TIMEOUT_MS }, () => {
  test("Status reports the store and its limits", async () => {
    const status = await kv.status();
    assert.equal(status.store, "memory");
    assert.ok((status.limits?.maxPageSize ?? 0) > 0);
    assert.ok(status.serverVersion.length > 0);
  });

  test("put and get text, raw bytes and an empty value", async () => {
    const first = await kv.put("ts/put/text", "hello, wörld");
    assert.equal(first.created, true);
    assert.equal(first.entry.version, 1n);
    assert.equal(first.entry.modRevision, first.revision);

    const second = await kv.put("ts/put/text", "again", { returnPrevious: true });
    assert.equal(second.created, false);
    assert.equal(second.revision, first.revision + 1n);
    assert.equal(second.previous?.text, "hello, wörld");

    const text = await kv.get("ts/put/text");
    assert.equal(text?.text, "again");
    assert.deepEqual(text?.value, new TextEncoder().encode("again"));
    assert.equal(text?.version, 2n);
    assert.equal(text?.createRevision, first.revision);
    assert.equal(text?.expireTime, undefined);

    const raw = new Uint8Array([0xff, 0x00, 0xfe]);
    await kv.put("ts/put/raw", raw);
    const bytes = await kv.get("ts/put/raw");
    assert.equal(bytes?.text, undefined, "invalid UTF-8 comes back as value_bytes");
    assert.deepEqual(bytes?.value, raw);

    await kv.put("ts/put/empty", "");
    const empty = await kv.get("ts/put/empty");
    assert.equal(empty?.text, "");
    assert.equal(empty?.value.length, 0);

    assert.equal(await kv.get("ts/put/absent"), undefined);
  });

  test("a TTL becomes an expire time", async () => {
    const before = Date.now();
    await kv.put("ts/ttl", "brief", { ttlMs: 60_000 });
    const entry = await kv.get("ts/ttl");
    assert.ok(entry?.expireTime, "expire_time is set");
    const delta = entry.expireTime.getTime() - before;
    assert.ok(delta > 50_000 && delta < 70_000, `expires in ${delta} ms`);
  });

  test("conditions: create-only, update-only and compare-and-set", async () => {
    const created = await kv.put("ts/cas", "v1", { ifAbsent: true });
    await rejectsWith(kv.put("ts/cas", "v2", { ifAbsent: true }), Code.Aborted);
    await rejectsWith(kv.put("ts/cas-absent", "v", { ifPresent: true }), Code.Aborted);
    await rejectsWith(kv.put("ts/cas", "v2", { ifModRevision: created.revision - 1n }), Code.Aborted);
    const swapped = await kv.put("ts/cas", "v2", { ifModRevision: created.revision, ifVersion: 1n });
    assert.equal(swapped.entry.version, 2n);
    assert.equal((await kv.get("ts/cas"))?.text, "v2");
    await rejectsWith(kv.put("", "no key"), Code.InvalidArgument);
  });

  test("delete one key, then a prefix", async () => {
    await kv.put("ts/del/a", "1");
    await kv.put("ts/del/b", "2");
    await kv.put("ts/del/c", "3");
    const one = await kv.delete("ts/del/a", { returnPrevious: true });
    assert.equal(one.deleted, 1n);
    assert.equal(one.previous[0]?.text, "1");
    await rejectsWith(kv.delete("ts/del/a"), Code.NotFound);
    assert.equal((await kv.delete("ts/del/a", { allowMissing: true })).deleted, 0n);

    const many = await kv.deletePrefix("ts/del/");
    assert.equal(many.deleted, 2n);
    assert.equal(many.revision, one.revision + 2n, "a prefix delete of N keys uses N revisions");
    assert.equal(await kv.get("ts/del/b"), undefined);
  });

  test("list pages through one snapshot, in key order", async () => {
    const keys = ["ts/list/a", "ts/list/b", "ts/list/c", "ts/list/d", "ts/list/e"];
    for (const key of [...keys].reverse()) {
      await kv.put(key, `value of ${key}`);
    }
    const first = await kv.listPage({ prefix: "ts/list/", pageSize: 2, includeCount: true });
    assert.equal(first.count, 5n);
    assert.deepEqual(first.entries.map((e) => e.key), keys.slice(0, 2));
    assert.notEqual(first.nextPageToken, "");

    // A write after the first page does not show in the later pages of the same listing.
    await kv.put("ts/list/f", "late");
    const second = await kv.listPage({ prefix: "ts/list/", pageSize: 2, pageToken: first.nextPageToken });
    assert.equal(second.revision, first.revision);
    assert.deepEqual(second.entries.map((e) => e.key), keys.slice(2, 4));
    const third = await kv.listPage({ prefix: "ts/list/", pageSize: 2, pageToken: second.nextPageToken });
    assert.deepEqual(third.entries.map((e) => e.key), keys.slice(4));
    assert.equal(third.nextPageToken, "");

    const all: string[] = [];
    for await (const entry of kv.list({ prefix: "ts/list/", pageSize: 2, keysOnly: true })) {
      assert.equal(entry.value.length, 0, "keys only");
      all.push(entry.key);
    }
    assert.deepEqual(all, [...keys, "ts/list/f"]);

    const range: string[] = [];
    for await (const entry of kv.list({ startKey: "ts/list/b", endKey: "ts/list/d" })) {
      range.push(entry.key);
    }
    assert.deepEqual(range, ["ts/list/b", "ts/list/c"]);
  });

  test("watch: start a watch, put from the client, receive the events live", async () => {
    await kv.put("ts/watch/live/existing", "before");
    const controller = new AbortController();
    const batches = kv.watch("ts/watch/live/", {
      prefix: true,
      includeInitialState: true,
      includePrevious: true,
      signal: controller.signal,
    });
    // The initial state ends with initial_state_complete: from then on the watch is live.
    const initial: string[] = [];
    for (;;) {
      const next = await batches.next();
      assert.ok(!next.done);
      initial.push(...next.value.initialEntries.map((e) => e.key));
      if (next.value.initialStateComplete) {
        break;
      }
    }
    assert.deepEqual(initial, ["ts/watch/live/existing"]);

    const put = await kv.put("ts/watch/live/existing", "after");
    const created = await kv.put("ts/watch/live/new", "fresh");
    const removed = await kv.delete("ts/watch/live/new");

    const events = await nextEvents(batches, 3);
    assert.deepEqual(
      events.map((e) => [e.type, e.entry.key, e.entry.modRevision]),
      [
        ["put", "ts/watch/live/existing", put.revision],
        ["put", "ts/watch/live/new", created.revision],
        ["delete", "ts/watch/live/new", removed.revision],
      ],
    );
    assert.equal(events[0]?.entry.text, "after");
    assert.equal(events[0]?.previous?.text, "before");

    controller.abort();
    const end = await batches.next();
    assert.equal(end.done, true, "aborting the signal ends the watch quietly");
  });

  test("watch: resume with start_revision after a disconnect, every event once, in order", async () => {
    const first = await kv.put("ts/watch/resume/k", "1");
    const batches = kv.watch("ts/watch/resume/", { prefix: true, startRevision: first.revision });
    const [seen] = await nextEvents(batches, 1);
    assert.equal(seen?.entry.modRevision, first.revision);
    await batches.return(); // leave the stream: the call is cancelled

    // Missed while disconnected.
    const second = await kv.put("ts/watch/resume/k", "2");
    const third = await kv.put("ts/watch/resume/other", "3");
    await kv.put("ts/unwatched", "not under the prefix");

    const resumed = kv.watch("ts/watch/resume/", { prefix: true, startRevision: seen!.entry.modRevision + 1n });
    const events = await nextEvents(resumed, 2);
    assert.deepEqual(
      events.map((e) => [e.entry.key, e.entry.text, e.entry.modRevision]),
      [
        ["ts/watch/resume/k", "2", second.revision],
        ["ts/watch/resume/other", "3", third.revision],
      ],
    );
    await resumed.return();
  });

  test("watch: one key with progress messages", async () => {
    const controller = new AbortController();
    const status = await kv.status();
    const batches = kv.watch("ts/watch/one", {
      startRevision: (status.header?.revision ?? 0n) + 1n,
      progressIntervalMs: 100,
      signal: controller.signal,
    });
    await kv.put("ts/watch/one-not-this", "x");
    const put = await kv.put("ts/watch/one", "y");
    const [event] = await nextEvents(batches, 1);
    assert.equal(event?.entry.key, "ts/watch/one");
    assert.equal(event?.entry.modRevision, put.revision);

    // With nothing to deliver, a progress message carries the current revision.
    const progress = await batches.next();
    assert.ok(!progress.done);
    assert.equal(progress.value.events.length, 0);
    assert.ok(progress.value.revision >= put.revision);
    controller.abort();
  });

  test("watch errors surface as ConnectError codes", async () => {
    await assert.rejects(
      (async () => {
        for await (const _ of kv.watch("", { prefix: false })) {
          assert.fail("no message expected");
        }
      })(),
      (err: unknown) => ConnectError.from(err).code === Code.InvalidArgument,
    );
    assert.equal(WatchCanceledError.name, "WatchCanceledError");
    assert.equal(WatchCancel_Reason.SHUTDOWN, 3);
  });

  test("the generated stubs work without the wrapper", async () => {
    const transport = createGrpcTransport({ baseUrl: `http://${server!.address}` });
    const client = createClient(KeyValue, transport);
    const put = await client.put(create(PutRequestSchema, { key: "ts/raw", content: { case: "value", value: "v" } }));
    const got = await client.get({ key: "ts/raw" });
    assert.equal(got.entry?.content.case, "value");
    assert.equal(got.entry?.content.value, "v");
    assert.equal(got.header?.revision, put.header?.revision);

    const abort = new AbortController();
    const stream = client.watch({ key: "ts/raw", startRevision: put.header!.revision }, { signal: abort.signal });
    for await (const message of stream) {
      assert.equal(message.events[0]?.type, Event_Type.PUT);
      break; // leaving the loop cancels the call
    }
    abort.abort();
    await rejectsWith(client.get({ key: "ts/raw/absent" }), Code.NotFound);
  });
});
