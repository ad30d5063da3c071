// Start a real kv-server on an ephemeral loopback port for the tests, and stop it by PID.
//
// The server is `$KV_SERVER`, or the repository's .venv/bin/kv-server (make setup). It runs with
// the memory store; its port is read from its log line `listening on 127.0.0.1:PORT` on stderr.

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// dist/test/server.js -> clients/typescript -> the repository root.
const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const DEFAULT_SERVER = resolve(PACKAGE_ROOT, "..", "..", ".venv", "bin", "kv-server");
const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 10_000;
const LISTENING = /listening on 127\.0\.0\.1:(\d+)/;

export interface RunningServer {
  address: string;
  process: ChildProcess;
  log: () => string;
}

export async function startServer(...extraArgs: string[]): Promise<RunningServer> {
  const executable = process.env.KV_SERVER ?? DEFAULT_SERVER;
  if (!existsSync(executable)) {
    throw new Error(`kv-server not found at ${executable}: run \`make setup\` or set KV_SERVER`);
  }
  const child = spawn(
    executable,
    ["--host", "127.0.0.1", "--port", "0", "--store", "memory", ...extraArgs],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let log = "";
  child.stderr?.setEncoding("utf8");
  const address = await new Promise<string>((resolvePort, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`kv-server did not start within ${START_TIMEOUT_MS} ms; its log:\n${log}`));
    }, START_TIMEOUT_MS);
    child.stderr?.on("data", (chunk: string) => {
      log += chunk;
      const match = LISTENING.exec(log);
      if (match) {
        clearTimeout(timer);
        resolvePort(`127.0.0.1:${match[1]}`);
      }
    });
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`kv-server exited (${code ?? signal}) before listening; its log:\n${log}`));
    });
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
  return { address, process: child, log: () => log };
}

/** SIGTERM by PID, then SIGKILL if it is still running after STOP_TIMEOUT_MS. */
export async function stopServer(server: RunningServer | undefined): Promise<void> {
  const child = server?.process;
  if (child?.pid === undefined || child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const pid = child.pid;
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  process.kill(pid, "SIGTERM");
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((done) => {
    timer = setTimeout(() => done(true), STOP_TIMEOUT_MS);
  });
  if (await Promise.race([exited.then(() => false), timedOut])) {
    process.kill(pid, "SIGKILL");
    await exited;
  }
  clearTimeout(timer);
}
