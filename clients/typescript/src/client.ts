// A small idiomatic wrapper over the generated kv.v1.KeyValue stubs (src/gen, protoc-gen-es) and
// Connect's gRPC transport for Node.js. Every method maps to one RPC; `rpc` is the generated
// client itself, for what the wrapper does not cover.
//
//   const kv = KvClient.connect("127.0.0.1:50051");
//   await kv.put("greeting", "hello");
//   const entry = await kv.get("greeting");        // undefined when the key is absent
//   for await (const e of kv.list({ prefix: "" })) console.log(e.key, e.text);
//   for await (const batch of kv.watch("", { prefix: true, signal })) console.log(batch.events);
//   kv.close();

import { create } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  DeleteRequestSchema,
  Event_Type,
  KeyValue,
  ListRequestSchema,
  PutRequestSchema,
  WatchCancel_Reason,
  WatchRequestSchema,
  type Entry,
  type Event,
  type StatusResponse,
} from "./gen/kv/v1/kv_pb.js";

export { Code, ConnectError };

/** One key with its value and metadata. Revisions and versions are int64, hence bigint. */
export interface KvEntry {
  key: string;
  /** The stored bytes (empty for an empty value, or when the listing asked for keys only). */
  value: Uint8Array;
  /** The value as text when it is valid UTF-8 (the server sent `value`), otherwise undefined. */
  text: string | undefined;
  contentType: string;
  createRevision: bigint;
  modRevision: bigint;
  version: bigint;
  /** When the key expires; undefined if it never does. */
  expireTime: Date | undefined;
}

export type KvEventType = "put" | "delete" | "expire";

export interface KvEvent {
  type: KvEventType;
  /** The key after the change; for delete and expire only the key and modRevision. */
  entry: KvEntry;
  /** The key before the change, when the watch asked for it and the key existed. */
  previous: KvEntry | undefined;
}

/** One message of a watch stream: events, initial entries, or only progress (a revision). */
export interface WatchBatch {
  /** Every matching event up to this revision has been delivered. */
  revision: bigint;
  events: KvEvent[];
  initialEntries: KvEntry[];
  initialStateComplete: boolean;
}

export type WatchCancelReason = "compacted" | "slow_consumer" | "shutdown" | "unspecified";

/** The server ended a watch with a `cancel` message: watch again from `resumeRevision`. */
export class WatchCanceledError extends Error {
  constructor(
    readonly reason: WatchCancelReason,
    readonly resumeRevision: bigint,
    readonly compactRevision: bigint,
    message: string,
  ) {
    super(`watch canceled (${reason}): ${message}`);
    this.name = "WatchCanceledError";
  }
}

export interface PutOptions {
  /** Time to live in milliseconds; 0 or absent: never expires. */
  ttlMs?: number;
  /** Create only: ABORTED if the key exists. */
  ifAbsent?: boolean;
  /** Update only: ABORTED if the key does not exist. */
  ifPresent?: boolean;
  /** Compare-and-set on the key's mod revision. */
  ifModRevision?: bigint;
  /** Compare-and-set on the key's version. */
  ifVersion?: bigint;
  returnPrevious?: boolean;
  contentType?: string;
}

export interface PutResult {
  revision: bigint;
  created: boolean;
  entry: KvEntry;
  previous: KvEntry | undefined;
}

export interface DeleteOptions {
  allowMissing?: boolean;
  ifModRevision?: bigint;
  ifVersion?: bigint;
  returnPrevious?: boolean;
}

export interface DeleteResult {
  revision: bigint;
  deleted: bigint;
  previous: KvEntry[];
}

export interface ListOptions {
  /** Keys that start with this prefix ("" is every key). Or give startKey/endKey. */
  prefix?: string;
  startKey?: string;
  endKey?: string;
  pageSize?: number;
  keysOnly?: boolean;
}

export interface ListPage {
  /** The snapshot revision shared by every page of the listing. */
  revision: bigint;
  entries: KvEntry[];
  /** Pass to listPage() for the next page; "" on the last page. */
  nextPageToken: string;
  /** Keys in the whole range, when includeCount was asked. */
  count: bigint;
}

export interface WatchOptions {
  /** Watch every key that starts with the given key. */
  prefix?: boolean;
  /** Deliver every event at or after this revision (resume); absent: only new events. */
  startRevision?: bigint;
  includeInitialState?: boolean;
  includePrevious?: boolean;
  progressIntervalMs?: number;
  /** Abort to end the watch; breaking out of the for-await loop ends it too. */
  signal?: AbortSignal;
}

export interface ClientOptions {
  /** Deadline of every unary call, in milliseconds (watch streams have none). Default 10 s. */
  timeoutMs?: number;
}

const utf8 = new TextEncoder();

function toEntry(entry: Entry | undefined): KvEntry {
  const content = entry?.content;
  let value: Uint8Array = new Uint8Array();
  let text: string | undefined = "";
  if (content?.case === "value") {
    text = content.value;
    value = utf8.encode(content.value);
  } else if (content?.case === "valueBytes") {
    text = undefined;
    value = content.value;
  }
  return {
    key: entry?.key ?? "",
    value,
    text,
    contentType: entry?.contentType ?? "",
    createRevision: entry?.createRevision ?? 0n,
    modRevision: entry?.modRevision ?? 0n,
    version: entry?.version ?? 0n,
    expireTime: entry?.expireTime ? timestampDate(entry.expireTime) : undefined,
  };
}

const EVENT_TYPES: Record<number, KvEventType> = {
  [Event_Type.PUT]: "put",
  [Event_Type.DELETE]: "delete",
  [Event_Type.EXPIRE]: "expire",
};

function toEvent(event: Event): KvEvent {
  const type = EVENT_TYPES[event.type];
  if (type === undefined) {
    throw new Error(`unexpected event type ${event.type}`);
  }
  return { type, entry: toEntry(event.entry), previous: event.prevEntry ? toEntry(event.prevEntry) : undefined };
}

const CANCEL_REASONS: Record<number, WatchCancelReason> = {
  [WatchCancel_Reason.COMPACTED]: "compacted",
  [WatchCancel_Reason.SLOW_CONSUMER]: "slow_consumer",
  [WatchCancel_Reason.SHUTDOWN]: "shutdown",
};

/** A kv.v1.KeyValue client over gRPC (HTTP/2, plaintext). */
export class KvClient {
  /** The generated Connect client: every RPC of kv.v1.KeyValue with its full request shape. */
  readonly rpc: Client<typeof KeyValue>;
  private readonly session: Http2SessionManager;
  private readonly unary: CallOptions;

  private constructor(baseUrl: string, options: ClientOptions) {
    this.session = new Http2SessionManager(baseUrl);
    this.rpc = createClient(KeyValue, createGrpcTransport({ baseUrl, sessionManager: this.session }));
    this.unary = { timeoutMs: options.timeoutMs ?? 10_000 };
  }

  /** `address` is "host:port" or a URL such as "http://127.0.0.1:50051". */
  static connect(address: string, options: ClientOptions = {}): KvClient {
    const baseUrl = /^https?:\/\//.test(address) ? address : `http://${address}`;
    return new KvClient(baseUrl, options);
  }

  /** Close the HTTP/2 connection (open streams are aborted). */
  close(): void {
    this.session.abort();
  }

  /** The key, or undefined when it does not exist (NOT_FOUND). */
  async get(key: string): Promise<KvEntry | undefined> {
    try {
      const response = await this.rpc.get({ key }, this.unary);
      return toEntry(response.entry);
    } catch (err) {
      if (ConnectError.from(err).code === Code.NotFound) {
        return undefined;
      }
      throw err;
    }
  }

  /** Create or replace a key. A failed condition throws a ConnectError with Code.Aborted. */
  async put(key: string, value: string | Uint8Array, options: PutOptions = {}): Promise<PutResult> {
    const request = create(PutRequestSchema, {
      key,
      content: typeof value === "string" ? { case: "value", value } : { case: "valueBytes", value },
      ttlMs: BigInt(options.ttlMs ?? 0),
      ifAbsent: options.ifAbsent ?? false,
      ifPresent: options.ifPresent ?? false,
      ifModRevision: options.ifModRevision ?? 0n,
      ifVersion: options.ifVersion ?? 0n,
      returnPrevious: options.returnPrevious ?? false,
      contentType: options.contentType ?? "",
    });
    const response = await this.rpc.put(request, this.unary);
    return {
      revision: response.header?.revision ?? 0n,
      created: response.created,
      entry: toEntry(response.entry),
      previous: response.prevEntry ? toEntry(response.prevEntry) : undefined,
    };
  }

  /** Delete one key. An absent key throws Code.NotFound unless allowMissing is set. */
  async delete(key: string, options: DeleteOptions = {}): Promise<DeleteResult> {
    return this.deleteRequest({ key, ...options });
  }

  /** Delete every key that starts with `prefix`. */
  async deletePrefix(prefix: string, options: Pick<DeleteOptions, "returnPrevious"> = {}): Promise<DeleteResult> {
    return this.deleteRequest({ key: prefix, prefix: true, ...options });
  }

  private async deleteRequest(fields: DeleteOptions & { key: string; prefix?: boolean }): Promise<DeleteResult> {
    const response = await this.rpc.delete(create(DeleteRequestSchema, fields), this.unary);
    return {
      revision: response.header?.revision ?? 0n,
      deleted: response.deleted,
      previous: response.prevEntries.map(toEntry),
    };
  }

  /** One page of a listing; pass the previous page's nextPageToken for the next. */
  async listPage(options: ListOptions & { pageToken?: string; includeCount?: boolean } = {}): Promise<ListPage> {
    const response = await this.rpc.list(create(ListRequestSchema, options), this.unary);
    return {
      revision: response.header?.revision ?? 0n,
      entries: response.entries.map(toEntry),
      nextPageToken: response.nextPageToken,
      count: response.count,
    };
  }

  /** Every key of the range, page after page, all read at one snapshot revision. */
  async *list(options: ListOptions = {}): AsyncGenerator<KvEntry, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.listPage({ ...options, pageToken });
      yield* page.entries;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /**
   * Stream the changes of one key (or, with prefix, of a prefix). Yields one batch per server
   * message, progress messages included; throws WatchCanceledError when the server ends the
   * stream with a cancel message. End it with options.signal or by leaving the loop.
   */
  async *watch(key: string, options: WatchOptions = {}): AsyncGenerator<WatchBatch, void, undefined> {
    const { signal, ...fields } = options;
    const request = create(WatchRequestSchema, {
      key,
      ...fields,
      progressIntervalMs: BigInt(fields.progressIntervalMs ?? 0),
    });
    const controller = new AbortController();
    const abort = () => controller.abort(signal?.reason);
    signal?.addEventListener("abort", abort, { once: true });
    try {
      for await (const message of this.rpc.watch(request, { signal: controller.signal })) {
        const cancel = message.cancel;
        if (cancel) {
          throw new WatchCanceledError(
            CANCEL_REASONS[cancel.reason] ?? "unspecified",
            cancel.resumeRevision,
            cancel.compactRevision,
            cancel.message,
          );
        }
        yield {
          revision: message.header?.revision ?? 0n,
          events: message.events.map(toEvent),
          initialEntries: message.initialEntries.map(toEntry),
          initialStateComplete: message.initialStateComplete,
        };
      }
    } catch (err) {
      if (signal?.aborted && ConnectError.from(err).code === Code.Canceled) {
        return; // ended by the caller
      }
      throw err;
    } finally {
      signal?.removeEventListener("abort", abort);
      controller.abort(); // leaving the loop early cancels the call
    }
  }

  /** The server's revision, limits and storage. */
  async status(): Promise<StatusResponse> {
    return this.rpc.status({}, this.unary);
  }
}
