// s3rver (a Node.js S3 server) on 127.0.0.1 for the tests and benchmarks, with request counts.
// Usage: node s3rver_main.js DIRECTORY [PORT]. Prints "TESS_S3_ENDPOINT=http://127.0.0.1:PORT" once
// listening; GET /_tess/stats answers the request counts by kind (as pipeline/server.py's moto does),
// DELETE /_tess/stats resets them. POST /_tess/delete-after-list?bucket=B&key=K arms a one-shot fault:
// the next listing of bucket B deletes key K from the store just before its answer is sent, so the
// client lists K and then finds it gone (a key deleted between LIST and GET, with no race).
// With TESS_TLS_CERT and TESS_TLS_KEY (PEM files) it serves HTTPS instead (the TLS tests and bench set).
// Exits when stdin closes, so a killed parent never leaves it behind.
'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const S3rver = require('s3rver');

const [directory, port = '0'] = process.argv.slice(2);
const app = new S3rver({ directory, silent: true, address: '127.0.0.1', port: 0 });
const counts = {};
let deleteAfterList = null; // {bucket, key} or null

function bucketOf(url) {
  return decodeURIComponent(url.split('?', 1)[0].replace(/^\/+/, '').split('/')[0]);
}

function kind(method, url) {
  const [path, query = ''] = url.split('?', 2);
  const parts = path.replace(/^\/+/, '').split('/');
  const hasKey = parts.length >= 2 && parts.slice(1).join('/') !== '';
  if (method === 'GET') {
    if (hasKey) return 'GET';
    const q = new URLSearchParams(query);
    return q.has('list-type') || q.has('prefix') || query === '' ? 'LIST' : 'GET_BUCKET_OTHER';
  }
  return method;
}

const handle = app.callback();
const tls = process.env.TESS_TLS_CERT && process.env.TESS_TLS_KEY
  ? { cert: fs.readFileSync(process.env.TESS_TLS_CERT), key: fs.readFileSync(process.env.TESS_TLS_KEY) }
  : null;
const serve = (handler) => (tls ? https.createServer(tls, handler) : http.createServer(handler));
const server = serve((req, res) => {
  if (req.url === '/_tess/stats') {
    if (req.method === 'DELETE') for (const k of Object.keys(counts)) delete counts[k];
    const body = JSON.stringify(counts);
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
    return;
  }
  if (req.url.startsWith('/_tess/delete-after-list?') && req.method === 'POST') {
    const q = new URLSearchParams(req.url.split('?', 2)[1]);
    deleteAfterList = { bucket: q.get('bucket'), key: q.get('key') };
    res.writeHead(204);
    res.end();
    return;
  }
  const k = kind(req.method, req.url);
  counts[k] = (counts[k] || 0) + 1;
  if (k === 'LIST' && deleteAfterList && bucketOf(req.url) === deleteAfterList.bucket) {
    const { bucket, key } = deleteAfterList;
    deleteAfterList = null;
    // The listing is computed with the key in it; delete the key before the answer leaves.
    const end = res.end;
    res.end = function (...args) {
      const send = () => end.apply(res, args);
      app.store.deleteObject(bucket, key).then(send, (err) => {
        process.stderr.write(`delete-after-list of ${key} failed: ${err}\n`);
        send();
      });
      return res;
    };
  }
  handle(req, res);
});
server.keepAliveTimeout = 60000;
server.listen(Number(port), '127.0.0.1', () => {
  process.stdout.write(`TESS_S3_ENDPOINT=${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}\n`);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
