// The kv TypeScript client: the KvClient wrapper, and the generated kv.v1 stubs as `kvv1`.
export * from "./client.js";
export * as kvv1 from "./gen/kv/v1/kv_pb.js";
