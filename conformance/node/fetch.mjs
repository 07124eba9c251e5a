#!/usr/bin/env node
// A kvcdn client written from proto/kvcdn/v1/kvcdn.proto and proto/kvcdn/v1/SPEC.md alone: the
// conformance check a third party can run. It fetches a published document's cache from a ring of
// edges (over gRPC or the bulk port), verifies every frame, fails over and resumes as the spec says,
// and writes what it received, so its bytes can be compared with kvcdn's own client.
//
//   node fetch.mjs --edges HOST:PORT[=W],... --doc NAME [--codecs raw,...] [--transport grpc|bulk]
//                  [--replicas 2] [--out FILE] [--vectors FILE]
//
// --out FILE: a raw cache in the layout of transformers' cache, per layer keys then values, each
// [tokens, kv_heads, head_dim] (an encoded one: its block payloads, in order). Prints one JSON line.
// --vectors FILE: check the spec's test vectors (keys, encodings, digests, ring) and exit.
// Exit status: 0 done; 1 a kvcdn error (the gRPC status name and message on stderr); 2 bad usage.

import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { blake3 } from "hash-wasm";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTO = path.resolve(here, "../../proto/kvcdn/v1/kvcdn.proto");
const MAX_MESSAGE = 8 << 20;
const END = 0xffffffff;
const ERROR = 0xfffffffe;
const STATUS = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

class KvcdnError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code; // a gRPC status name
  }
}

// --- spec section 2: keys ---------------------------------------------------------------------------

const sha256 = (...parts) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest();
};

function leU32(ids) {
  const buf = Buffer.alloc(4 * ids.length);
  ids.forEach((id, i) => buf.writeUInt32LE(id, 4 * i));
  return buf;
}

export function blockKeys(fingerprint, ids, blockTokens) {
  const keys = [];
  let prev = fingerprint;
  for (let start = 0; start < ids.length; start += blockTokens) {
    prev = sha256(prev, leU32(ids.slice(start, start + blockTokens)));
    keys.push(prev);
  }
  return keys;
}

export function encodedKey(key, codec) {
  return codec === "raw" || codec === "" ? key : sha256(key, Buffer.from("kvcdn-codec:" + codec, "ascii"));
}

// --- spec section 6: the ring -------------------------------------------------------------------------

const md5int = (s) => BigInt("0x" + createHash("md5").update(s, "utf8").digest("hex"));

export class Ring {
  constructor(edges, replicas = 2) {
    const points = new Map();
    for (const [name, weight] of Object.entries(edges)) {
      for (let w = 0; w < 160 * weight; w++) points.set(md5int(`${name}-${w}`), name);
    }
    this.points = [...points.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    this.owner = points;
    this.size = new Set(points.values()).size;
    this.replicas = replicas;
  }

  route(key) {
    const x = md5int(key.toString("hex"));
    let lo = 0;
    let hi = this.points.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.points[mid] > x) hi = mid;
      else lo = mid + 1;
    }
    const out = [];
    for (let i = 0; i < this.points.length && out.length < this.size; i++) {
      const name = this.owner.get(this.points[(lo + i) % this.points.length]);
      if (!out.includes(name)) out.push(name);
    }
    return out;
  }

  owners(key) {
    return this.route(key).slice(0, this.replicas);
  }
}

function parseEdges(spec) {
  const edges = {};
  for (const item of spec.split(",").filter(Boolean)) {
    const [address, weight] = item.split("=");
    edges[address] = weight ? Number(weight) : 1;
  }
  if (!Object.keys(edges).length) usage("--edges names no edge");
  return edges;
}

// --- gRPC and the bulk stream ---------------------------------------------------------------------

const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, defaults: true });
const v1 = grpc.loadPackageDefinition(definition).kvcdn.v1;
const root = new protobuf.Root().loadSync(PROTO, { keepCase: true });
const StreamBlocksRequest = root.lookupType("kvcdn.v1.StreamBlocksRequest");
const FrameHeader = root.lookupType("kvcdn.v1.FrameHeader");

const stubs = new Map();
function stub(address) {
  if (!stubs.has(address)) {
    const options = { "grpc.max_receive_message_length": MAX_MESSAGE, "grpc.max_send_message_length": MAX_MESSAGE };
    stubs.set(address, new v1.KVCache(address, grpc.credentials.createInsecure(), options));
  }
  return stubs.get(address);
}

function unary(address, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 30_000);
    stub(address)[method](request, { deadline }, (err, resp) =>
      err ? reject(new KvcdnError(STATUS[err.code], `${address}: ${err.details}`)) : resolve(resp),
    );
  });
}

// Frames of one request as {header, payload} objects, over gRPC.
async function* grpcFrames(address, request) {
  const call = stub(address).StreamBlocks(request, { deadline: new Date(Date.now() + 300_000) });
  try {
    for await (const frame of call) yield { header: frame.header, payload: frame.payload };
  } catch (err) {
    throw new KvcdnError(STATUS[err.code] ?? "UNAVAILABLE", `${address}: ${err.details ?? err.message}`);
  } finally {
    call.cancel(); // a stream left early (a bad frame) must not stay open
  }
}

// Frames of one request over the bulk port: one request per connection (spec section 7).
async function* bulkFrames(address, bulkPort, request) {
  const host = address.slice(0, address.lastIndexOf(":")).replace(/^\[|\]$/g, "");
  const socket = net.connect({ host, port: bulkPort });
  const body = StreamBlocksRequest.encode(StreamBlocksRequest.create(request)).finish();
  const head = Buffer.alloc(4);
  head.writeUInt32LE(body.length);
  socket.write(Buffer.concat([head, body]));
  let buffered = Buffer.alloc(0);
  const chunks = socket[Symbol.asyncIterator]();
  async function take(n) {
    while (buffered.length < n) {
      const { value, done } = await chunks.next();
      if (done) throw new KvcdnError("UNAVAILABLE", `${address} bulk: the stream ended early`);
      buffered = Buffer.concat([buffered, value]);
    }
    const out = buffered.subarray(0, n);
    buffered = buffered.subarray(n);
    return out;
  }
  try {
    for (;;) {
      const pair = await take(8);
      const [a, b] = [pair.readUInt32LE(0), pair.readUInt32LE(4)];
      if (a === END) return;
      if (a === ERROR) {
        const record = await take(b);
        throw new KvcdnError(STATUS[record.readUInt32LE(0)], `${address}: ${record.subarray(4).toString("utf8")}`);
      }
      if (a > 4096) throw new KvcdnError("DATA_LOSS", `${address} bulk: a ${a}-byte frame header`);
      const header = FrameHeader.toObject(FrameHeader.decode(await take(a)), { longs: Number, defaults: true });
      yield { header, payload: Buffer.from(await take(b)) };
    }
  } catch (err) {
    if (err instanceof KvcdnError) throw err;
    throw new KvcdnError("UNAVAILABLE", `${address} bulk: ${err.message}`);
  } finally {
    socket.destroy();
  }
}

// --- a fetch (spec section 1) ---------------------------------------------------------------------

function checkInfos(blocks, keys, codec, geometry, tokens, accepted) {
  if (!accepted.includes(codec)) throw new KvcdnError("DATA_LOSS", `lookup answered in ${codec}, not accepted`);
  const element = { float32: 4, float16: 2, bfloat16: 2 }[geometry.dtype];
  const tokenBytes = geometry.layers * 2 * geometry.kv_heads * geometry.head_dim * element;
  blocks.forEach((info, i) => {
    const n = Math.min(geometry.block_tokens, tokens - i * geometry.block_tokens);
    const ok =
      i < keys.length &&
      Buffer.compare(info.key, encodedKey(keys[i], codec)) === 0 &&
      info.index === i &&
      info.n_tokens === n &&
      (info.codec || "raw") === codec &&
      (codec === "raw" ? info.n_bytes === n * tokenBytes && info.raw_bytes === 0 : info.raw_bytes === n * tokenBytes) &&
      info.frame_digests.length === Math.ceil(info.n_bytes / geometry.frame_bytes);
    if (!ok) throw new KvcdnError("DATA_LOSS", `lookup answered with a malformed block ${i}`);
  });
}

async function fetchDocument(options) {
  const edges = parseEdges(options.edges);
  const ring = new Ring(edges, options.replicas);
  const anyEdge = Object.keys(edges)[0];
  const info = await unary(anyEdge, "GetInfo", {});
  const geometry = info.geometry;
  const manifest = await unary(anyEdge, "GetManifest", { document: options.doc, version: 0, token_ids: true });
  const ids = manifest.token_ids;
  const fingerprint = Buffer.from(info.fingerprint, "hex");
  const keys = blockKeys(fingerprint, ids, geometry.block_tokens);
  const keysMatchManifest =
    keys.length === manifest.blocks.length && keys.every((k, i) => Buffer.compare(k, manifest.blocks[i].key) === 0);
  const contentDigest = sha256(leU32(ids)).toString("hex");
  if (!keysMatchManifest || contentDigest !== manifest.content_digest) {
    throw new KvcdnError("FAILED_PRECONDITION", "the manifest's keys are not those of its token ids");
  }

  const accepted = options.codecs.split(",");
  const lookupRequest = { fingerprint: info.fingerprint, keys, codecs: accepted };
  let blocks = [];
  for (const address of ring.route(keys[0])) {
    try {
      blocks = (await unary(address, "LookupPrefix", lookupRequest)).blocks;
      break;
    } catch (err) {
      if (err.code !== "UNAVAILABLE") throw err;
    }
  }
  const codec = blocks.length ? blocks[0].codec || "raw" : accepted[0];
  checkInfos(blocks, keys, codec, geometry, ids.length, accepted);

  // Runs of consecutive blocks with the same primary owner, each streamed from its route.
  const runs = [];
  for (const info of blocks) {
    const owner = ring.owners(info.key)[0];
    if (runs.length && runs.at(-1).owner === owner) runs.at(-1).blocks.push(info);
    else runs.push({ owner, blocks: [info] });
  }
  const payloads = blocks.map((b) => Buffer.alloc(b.n_bytes));
  const used = new Set();
  let failovers = 0;
  const bulkPorts = new Map();

  async function streamRun(run) {
    let next = 0; // index in run.blocks of the block due
    let frame = 0; // frame due within it
    const route = ring.route(run.blocks[0].key);
    let lastError = null;
    for (const address of route) {
      if (next === run.blocks.length) break;
      const request = {
        fingerprint: info.fingerprint,
        keys: run.blocks.slice(next).map((b) => b.key),
        start_frame: frame,
        from_peer: false,
      };
      try {
        let frames;
        if (options.transport === "bulk") {
          if (!bulkPorts.has(address)) bulkPorts.set(address, (await unary(address, "GetInfo", {})).bulk_port);
          frames = bulkFrames(address, bulkPorts.get(address), request);
        } else {
          frames = grpcFrames(address, request);
        }
        for await (const { header, payload } of frames) {
          const block = run.blocks[next];
          if (!block) throw new KvcdnError("DATA_LOSS", `${address} sent more frames than asked for`);
          const start = frame * geometry.frame_bytes;
          const size = Math.min(geometry.frame_bytes, block.n_bytes - start);
          const ok =
            Buffer.compare(header.block_key, block.key) === 0 &&
            header.frame_index === frame &&
            Number(header.offset) === start &&
            payload.length === size &&
            (await blake3(payload)) === Buffer.from(block.frame_digests[frame]).toString("hex");
          if (!ok) throw new KvcdnError("DATA_LOSS", `${address} sent a bad frame ${frame} of block ${block.index}`);
          payload.copy(payloads[block.index], start);
          used.add(address);
          frame += 1;
          if (frame === block.frame_digests.length) {
            next += 1;
            frame = 0;
          }
        }
        if (next < run.blocks.length) throw new KvcdnError("UNAVAILABLE", `${address} ended the stream early`);
      } catch (err) {
        if (!(err instanceof KvcdnError) || !["UNAVAILABLE", "DATA_LOSS", "NOT_FOUND"].includes(err.code)) throw err;
        lastError = err;
        failovers += 1; // resume at the next edge of the route, from the frame due
      }
    }
    if (next < run.blocks.length) throw lastError;
  }
  await Promise.all(runs.map(streamRun));

  let out = Buffer.concat(payloads);
  const cachedTokens = blocks.reduce((n, b) => n + b.n_tokens, 0);
  if (codec === "raw" && blocks.length) out = toCacheLayout(payloads, blocks, geometry, cachedTokens);
  return {
    document: manifest.document,
    version: manifest.version,
    tokens: ids.length,
    cached_tokens: cachedTokens,
    codec,
    blocks: blocks.length,
    payload_bytes: blocks.reduce((n, b) => n + b.n_bytes, 0),
    keys_match_manifest: keysMatchManifest,
    edges_used: [...used].sort(),
    failovers,
    out,
  };
}

// Block payloads (spec section 3) -> per layer keys then values, each [tokens, kv_heads, head_dim].
function toCacheLayout(payloads, blocks, geometry, tokens) {
  const element = { float32: 4, float16: 2, bfloat16: 2 }[geometry.dtype];
  const rowBytes = geometry.kv_heads * geometry.head_dim * element;
  const out = Buffer.alloc(2 * geometry.layers * tokens * rowBytes);
  let t0 = 0;
  blocks.forEach((block, b) => {
    const n = block.n_tokens;
    for (let s = 0; s < 2 * geometry.layers; s++) {
      payloads[b].copy(out, (s * tokens + t0) * rowBytes, s * n * rowBytes, (s + 1) * n * rowBytes);
    }
    t0 += n;
  });
  return out;
}

// --- test vectors ---------------------------------------------------------------------------------

async function checkVectors(file) {
  const v = JSON.parse(readFileSync(file, "utf8"));
  const failures = [];
  const bk = v.block_keys;
  const keys = blockKeys(Buffer.from(bk.fingerprint_hex, "hex"), bk.ids, bk.block_tokens).map((k) => k.toString("hex"));
  if (JSON.stringify(keys) !== JSON.stringify(bk.keys_hex)) failures.push("block_keys");
  for (const e of v.encoded_keys) {
    if (encodedKey(Buffer.from(e.key_hex, "hex"), e.codec).toString("hex") !== e.encoded_hex) failures.push(`encoded ${e.codec}`);
  }
  if ((await blake3(Buffer.from(v.frame_digest.payload_utf8, "utf8"))) !== v.frame_digest.blake3_hex) failures.push("blake3");
  if (sha256(Buffer.from(v.model_fingerprint.canonical_json, "ascii")).toString("hex") !== v.model_fingerprint.fingerprint_hex) {
    failures.push("fingerprint");
  }
  const ring = new Ring(v.ring.edges, v.ring.replicas);
  for (const r of v.ring.routes) {
    const key = Buffer.from(r.key_hex, "hex");
    if (JSON.stringify(ring.route(key)) !== JSON.stringify(r.route)) failures.push(`route ${r.key_hex.slice(0, 8)}`);
    if (JSON.stringify(ring.owners(key)) !== JSON.stringify(r.owners)) failures.push(`owners ${r.key_hex.slice(0, 8)}`);
  }
  return { vectors: file, checked: 4 + v.encoded_keys.length + 2 * v.ring.routes.length, failures };
}

// --- command line ---------------------------------------------------------------------------------

function usage(message) {
  process.stderr.write(`kvcdn-fetch: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const options = { codecs: "raw", transport: "grpc", replicas: 2 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (!flag.startsWith("--") || value === undefined) usage(`expected --flag value pairs, got ${flag}`);
    options[flag.slice(2)] = flag === "--replicas" ? Number(value) : value;
  }
  if (!options.vectors && (!options.edges || !options.doc)) usage("--edges and --doc are required (or --vectors FILE)");
  if (!["grpc", "bulk"].includes(options.transport)) usage("--transport is grpc or bulk");
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  if (options.vectors) {
    const result = await checkVectors(options.vectors);
    process.stdout.write(JSON.stringify(result) + "\n");
    return result.failures.length ? 1 : 0;
  }
  try {
    const { out, ...summary } = await fetchDocument(options);
    if (options.out) writeFileSync(options.out, out);
    process.stdout.write(JSON.stringify(summary) + "\n");
    return 0;
  } catch (err) {
    if (!(err instanceof KvcdnError)) throw err;
    process.stderr.write(`kvcdn-fetch: ${err.code}: ${err.message}\n`);
    return 1;
  } finally {
    for (const s of stubs.values()) s.close();
  }
}

process.exit(await main());
