// The seed guide's own stack, Node + ws, as a Media Streams echo server: the yardstick callsock is
// measured against (benchmarks/run.py starts it). It does what the seed describes and no more:
// one WebSocketServer on a port and path, JSON.parse of every message, start validation, the
// seed's start acknowledgement for seed-dialect starts, and each media frame base64-decoded,
// mu-law-decoded to 16-bit PCM, re-encoded and sent back as an outbound media message.
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 8081);
const path = process.argv[3] || '/call';

// G.711 mu-law: a 256-entry decode table and a 16384-entry encode table over 14-bit samples.
const DECODE = new Int16Array(256);
for (let code = 0; code < 256; code++) {
  const c = ~code & 0xff;
  const magnitude = ((((c & 0x0f) << 3) + 0x84) << ((c >> 4) & 7)) - 0x84;
  DECODE[code] = c & 0x80 ? -magnitude : magnitude;
}
const ENCODE = new Uint8Array(16384);
for (let i = 0; i < 16384; i++) {
  const sample = i - 8192; // 14-bit value
  let mag = sample < 0 ? -sample : sample;
  if (mag > 8159) mag = 8159;
  mag += 33;
  let segment = 0;
  for (let v = mag >> 6; v; v >>= 1) segment++;
  const code = (segment << 4) | ((mag >> (segment + 1)) & 0x0f);
  ENCODE[i] = sample < 0 ? ~code & 0x7f : ~code & 0xff;
}

function validateStart(msg) {
  if (!msg.streamSid) throw new Error('Missing streamSid');
  const tracks = msg.start && msg.start.tracks;
  if (!tracks || !tracks.length) throw new Error('Missing track configuration');
  for (const track of tracks) {
    const id = typeof track === 'string' ? track : track.id;
    if (id !== 'inbound' && id !== 'outbound') throw new Error('Invalid track id');
    const format = typeof track === 'string' ? msg.start.mediaFormat : { encoding: track.format, sampleRate: track.rate, channels: track.channels };
    if (!format || format.encoding !== 'audio/x-mulaw' || format.sampleRate !== 8000 || format.channels !== 1) {
      throw new Error('Invalid track configuration');
    }
  }
}

const wss = new WebSocketServer({ port, path, perMessageDeflate: false });
wss.on('connection', (ws) => {
  let streamSid = null;
  ws.on('message', (data, isBinary) => {
    if (isBinary) return ws.close(1003, 'binary frame');
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch (e) {
      return ws.close(1007, 'invalid JSON');
    }
    switch (msg.event) {
      case 'connected':
        return;
      case 'start':
        try { validateStart(msg); } catch (e) { return ws.close(1007, e.message); }
        streamSid = msg.streamSid;
        if (typeof msg.start.tracks[0] !== 'string') {
          ws.send(JSON.stringify({ event: 'start', protocol: 'wss', version: '1.0.0', streamSid,
            tracks: msg.start.tracks.map((t) => ({ id: t.id })) }));
        }
        return;
      case 'media': {
        if (msg.streamSid !== streamSid) return ws.close(1008, 'wrong streamSid');
        const ulaw = Buffer.from(msg.media.payload, 'base64');
        const pcm = new Int16Array(ulaw.length);
        for (let i = 0; i < ulaw.length; i++) pcm[i] = DECODE[ulaw[i]];
        const out = Buffer.allocUnsafe(pcm.length);
        for (let i = 0; i < pcm.length; i++) out[i] = ENCODE[(pcm[i] >> 2) + 8192];
        ws.send(JSON.stringify({ event: 'media', streamSid, media: { payload: out.toString('base64') } }));
        return;
      }
      case 'stop':
        return ws.close(1000, 'stream stopped');
      default:
        return;
    }
  });
});
wss.on('listening', () => console.log(`listening on ${port}${path}`));
