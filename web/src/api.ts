// The gateway's session API and a session's streams, as the page uses them.

import type { HouseholdUser, LatencySummary } from "./measure";

export interface PublicPool {
  namespace: string;
  name: string;
  // The pool's Tier, as the WarmPool spells it.
  tier: Record<string, unknown>;
  warm: number;
}

export type Grade = "A+" | "A" | "B" | "C" | "D" | "F";

export interface HouseholdUserResult {
  user: HouseholdUser;
  baselineMs: number;
  meanMs: number;
  jitterMs: number;
  sharePercent: number;
  severity: string;
}

/** The TestSession's results, as its status and the pod carry them. */
export interface SessionResults {
  latency?: LatencySummary;
  loadedLatency?: { downloadMs?: number; uploadMs?: number; bidirectionalMs?: number };
  downloadMbps?: number;
  uploadMbps?: number;
  grades?: { bufferbloat?: Grade; household?: Grade; overall?: Grade; qualityPoints?: number };
  household?: HouseholdUserResult[];
  final?: boolean;
  reportedAt?: string;
}

export interface SessionView {
  name: string;
  namespace: string;
  pool: string;
  phase: string;
  pod?: string;
  token?: string;
  expiresAt?: string;
  reason?: string;
  results?: SessionResults;
}

/** An answer the gateway refused, with its reason and when to try again. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
  }
}

async function answer<T>(response: Response): Promise<T> {
  const text = await response.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  if (!response.ok) {
    const error = (body as { error?: string } | undefined)?.error ?? `the gateway answered ${response.status}`;
    const retry = Number(response.headers.get("retry-after") ?? "");
    throw new ApiError(error, response.status, Number.isFinite(retry) && retry > 0 ? retry : undefined);
  }
  return body as T;
}

export async function publicPools(): Promise<PublicPool[]> {
  const { pools } = await answer<{ pools: PublicPool[] }>(await fetch("/api/v1/pools"));
  return pools;
}

/** Starts a session on a public pool; the gateway answers once it is Ready. */
export async function createSession(pool: PublicPool, profile: string): Promise<SessionView> {
  const response = await fetch("/api/v1/sessions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ pool: pool.name, namespace: pool.namespace, profile }),
  });
  const session = await answer<SessionView>(response);
  if (!session.token) throw new ApiError(`session ${session.name} came back without a token`, 500);
  return session;
}

export async function readSession(namespace: string, name: string, token: string): Promise<SessionView> {
  const url = `/api/v1/sessions/${encodeURIComponent(name)}?namespace=${encodeURIComponent(namespace)}`;
  return answer<SessionView>(await fetch(url, { headers: { authorization: `Bearer ${token}` } }));
}

/** A session's streams through the gateway, which picks its pod by the token. */
export class SessionStreams {
  constructor(readonly session: SessionView & { token: string }) {}

  url(path: string): string {
    return `/s${path}`;
  }

  headers(): HeadersInit {
    return { authorization: `Bearer ${this.session.token}` };
  }

  /** Browsers cannot set headers on a WebSocket: the token goes in the query. */
  websocket(path: string): WebSocket {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/s${path}?token=${encodeURIComponent(this.session.token)}`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    return socket;
  }

  async submit(results: SessionResults, final: boolean): Promise<{ results: SessionResults; reported: boolean; reportError?: string }> {
    const response = await fetch(this.url("/api/v1/results"), {
      method: "POST",
      headers: { ...this.headers(), "content-type": "application/json" },
      body: JSON.stringify({ results, final }),
    });
    return answer(response);
  }
}

/** Waits for a socket to open, or fails after `ms`. */
export function opened(socket: WebSocket, ms = 5000): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the WebSocket did not open in time")), ms);
    socket.addEventListener("open", () => (clearTimeout(timer), resolve()), { once: true });
    socket.addEventListener("error", () => (clearTimeout(timer), reject(new Error("the WebSocket failed"))), { once: true });
  });
}

/** One frame of the operators' cluster view (protocol/src/cluster.rs). */
export interface ClusterView {
  namespace: string;
  pools: Array<{ name: string; size: number; warm: number; assigned: number; pending: number; public: boolean }>;
  sessions: Array<{ name: string; pool: string; phase: string; pod?: string; createdUnix: number; grade?: Grade }>;
  sessionsTotal: number;
  /** Absent when the token may not list Tubes in the namespace. */
  tubes?: Array<{
    name: string;
    kind: string;
    target?: string;
    pool?: string;
    state: string;
    pod?: string;
    bytesSent: number;
    bytesReceived: number;
    openConnections: number;
    createdUnix: number;
    endReason?: string;
  }>;
  tubesTotal: number;
  backends: Array<{
    name: string;
    kind: string;
    region?: string;
    corePercent: number[];
    memoryUsedPercent?: number;
    gpuPercent?: number;
    gpus: number;
    health: string;
    stale: boolean;
  }>;
}

/** Splits server-sent events out of text as it arrives; keeps a partial event for the next call. */
export class EventParser {
  private buffer = "";

  push(text: string): Array<{ event: string; data: string }> {
    this.buffer += text.replace(/\r\n/g, "\n");
    const events: Array<{ event: string; data: string }> = [];
    let end: number;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
      if (data.length > 0) events.push({ event, data: data.join("\n") });
    }
    return events;
  }
}

/** Follows the cluster view with an operator's Kubernetes token until `signal`
 * aborts it. EventSource cannot send a token, so this reads the stream itself. */
export async function watchCluster(
  token: string,
  namespace: string,
  signal: AbortSignal,
  onView: (view: ClusterView) => void,
): Promise<void> {
  const query = namespace ? `?namespace=${encodeURIComponent(namespace)}` : "";
  const response = await fetch(`/api/v1/cluster${query}`, { headers: { authorization: `Bearer ${token}` }, signal });
  if (!response.ok || !response.body) await answer(response);
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventParser();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    for (const { event, data } of parser.push(value)) if (event === "cluster") onView(JSON.parse(data));
  }
}
