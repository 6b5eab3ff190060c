// A real OpenID Provider (panva/oidc-provider v9) for tokengate's integration tests and demo.
//
// Run:   node tests/idp/server.js            (after `npm ci --prefix tests/idp`)
//
// Configuration, all optional except `clients`:
//   IDP_CONFIG       JSON text (below); or
//   IDP_CONFIG_FILE  path to a file holding that JSON (IDP_CONFIG wins when both are set)
//   IDP_PORT / IDP_HOST  override config.port / config.host
//
//   {
//     "host": "127.0.0.1",                 // listen address; only loopback is sensible
//     "port": 0,                           // 0 = pick a free port; the real one is printed
//     "issuer": null,                      // default http://<host>:<port>
//     "resource": "https://api.example.test", // the audience of JWT access tokens
//     "resource_scopes": "api.read api.write",
//     "opaque_resource": null,             // a second resource server whose access tokens
//                                          // are opaque (introspect them), same scopes;
//                                          // e.g. "https://opaque.example.test"
//     "access_token_ttl": 30,              // seconds, access tokens for either resource
//     "id_token_ttl": 3600,
//     "refresh_token_ttl": 86400,
//     "authorization_code_ttl": 60,
//     "session_ttl": 86400,                // the IdP's own login session
//     "interaction_ttl": 600,
//     "grant_ttl": 86400,
//     "jwks": null,                        // private JWKS {"keys": [...]} to keep keys stable
//                                          // across restarts; default: fresh RS256 + ES256 keys
//     "cookie_keys": null,                 // default: random
//     "introspectors": [],                 // client_ids that may introspect any client's
//                                          // tokens (resource servers); a token's own
//                                          // client always may
//     "clients": [ {oidc-provider client metadata}, ... ]
//   }
//
// Each client is oidc-provider client metadata (client_id, client_secret,
// token_endpoint_auth_method, jwks, redirect_uris, post_logout_redirect_uris,
// backchannel_logout_uri, ...). Defaults filled in when absent: grant_types
// [authorization_code, refresh_token], response_types [code],
// backchannel_logout_session_required true. A machine client sets grant_types
// ["client_credentials"] and response_types [] (no redirect_uris); a resource server that
// only introspects sets grant_types [] and response_types [].
//
// Behaviour:
//   - PKCE S256 is required for every client.
//   - offline_access in a GET authorization request yields a refresh token, with or without
//     prompt=consent (oidc-provider alone would want prompt=consent); such refresh tokens
//     outlive the IdP session like real offline access, but die with the grant. Refresh
//     tokens rotate; reuse of a rotated one revokes the whole grant (invalid_grant).
//   - ID tokens carry name/email/preferred_username; `sid` only for clients with a
//     backchannel_logout_uri (oidc-provider's rule).
//   - Access tokens are RS256 JWTs with aud = `resource`, scope = the granted subset of
//     `resource_scopes`, also after refresh (useGrantedResource). With `resource` =
//     `opaque_resource` in the request (RFC 8707), they are opaque instead, with the same
//     scopes: only introspection tells what they are.
//   - client_credentials grants (RFC 6749 §4.4) for clients that list it; the resource is
//     `resource` unless the request names `opaque_resource`.
//   - DPoP (RFC 9449, on by default in oidc-provider 9, no nonce): a token request with a
//     DPoP proof gets a DPoP-bound token (token_type DPoP; cnf.jkt in a JWT access token,
//     and in the introspection answer of an opaque one).
//   - Introspection: by the token's own client, or by a client listed in `introspectors`.
//     Revocation: by the token's own client only. Either works for opaque access tokens
//     and refresh tokens; JWT access tokens cannot be introspected nor revoked
//     (oidc-provider refuses structured tokens).
//   - Login (devInteractions): any login name with any password; sub = the login name,
//     name/email/preferred_username derived from it. Consent is a single "Continue" form.
//   - Outgoing requests (back-channel logout) may target loopback addresses.
//
// Test control endpoints (not part of OIDC; JSON in and out):
//   GET  /__test/stats             counts: token requests, grants by grant_type,
//                                  errors by code and by grant_type, injected failures,
//                                  revocations, introspections, back-channel logouts
//   POST /__test/reset             zero the counts AND restore normal token behaviour
//   GET  /__test/token-behaviour   the current behaviour
//   POST /__test/token-behaviour   {"delay_ms": N, "status": 503|null, "error": "code"|null,
//                                   "hang": bool, "grant_type": "refresh_token"|null,
//                                   "times": N|null}
//        delay_ms: wait, then go on (to the injected status, or to the real provider: a
//                  client that gave up meanwhile still has its refresh token rotated)
//        status:   answer with that status and {"error": error|temporarily_unavailable|
//                  invalid_request} without reaching the provider
//        hang:     never answer (until the client disconnects or the behaviour is reset)
//        grant_type: only requests with this grant_type are affected
//        times:    only the next N affected requests; then normal again (null = until changed)
//        {} restores normal behaviour.
//   POST /__test/clients           {client metadata with client_id}: create the client, or
//                                  merge into it (a null value removes a field); refused
//                                  with 400 when invalid. E.g. point redirect_uris and
//                                  backchannel_logout_uri at a gateway started later.
//   GET  /__test/clients/<id>      the stored metadata
//   GET  /__test/sessions?sub=alice  live IdP sessions: [{sub, session_uid, clients:
//                                   {client_id: {sid, grant_id}}}]
//   POST /__test/backchannel-logout {"sub": "alice", "sid": null, "client_id": null,
//                                    "end_session": true}
//        For every live IdP session of `sub` (optionally only the one whose per-client sid
//        is `sid`), the provider itself signs a logout token and POSTs it to the
//        backchannel_logout_uri of each client in that session (optionally only
//        `client_id`), as end_session would. With end_session (default) the IdP session
//        is then destroyed and its grants revoked (refresh tokens stop working).
//        Answers {"sessions": n, "deliveries": [{client_id, sid, ok, error?}]} after the
//        RPs answered. A real RP-initiated logout (GET end_session_endpoint, submit the
//        form with logout=yes) sends the same logout tokens.
//
// Prints exactly one line `READY <port>` on stdout when listening (every other log line
// goes to stderr). Exits 0 on SIGTERM / SIGINT.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints NOTICE lines with console.info; keep stdout for the READY line.
console.log = console.error;
console.info = console.error;

function fail(message) {
  console.error(`tokengate test idp: ${message}`);
  process.exit(2);
}

function loadConfig() {
  let config = {};
  try {
    if (process.env.IDP_CONFIG) {
      config = JSON.parse(process.env.IDP_CONFIG);
    } else if (process.env.IDP_CONFIG_FILE) {
      config = JSON.parse(fs.readFileSync(process.env.IDP_CONFIG_FILE, 'utf8'));
    }
  } catch (err) {
    fail(`cannot read the configuration: ${err.message}`);
  }
  if (process.env.IDP_PORT) config.port = Number(process.env.IDP_PORT);
  if (process.env.IDP_HOST) config.host = process.env.IDP_HOST;
  const c = {
    host: '127.0.0.1',
    port: 0,
    issuer: null,
    resource: 'https://api.example.test',
    resource_scopes: 'api.read api.write',
    access_token_ttl: 30,
    id_token_ttl: 3600,
    refresh_token_ttl: 86400,
    authorization_code_ttl: 60,
    session_ttl: 86400,
    interaction_ttl: 600,
    grant_ttl: 86400,
    opaque_resource: null,
    jwks: null,
    cookie_keys: null,
    introspectors: [],
    clients: [],
    ...config,
  };
  if (!Array.isArray(c.clients) || c.clients.length === 0) {
    fail('config.clients must list at least one client');
  }
  for (const key of Object.keys(c).filter((k) => k.endsWith('_ttl'))) {
    if (!Number.isSafeInteger(c[key]) || c[key] <= 0) fail(`config.${key} must be a positive integer`);
  }
  if (!Number.isSafeInteger(c.port) || c.port < 0 || c.port > 65535) fail('config.port must be 0..65535');
  if (c.opaque_resource !== null && (typeof c.opaque_resource !== 'string' || c.opaque_resource === c.resource)) {
    fail('config.opaque_resource must be null or a URL other than config.resource');
  }
  if (!Array.isArray(c.introspectors) || !c.introspectors.every((id) => typeof id === 'string')) {
    fail('config.introspectors must be a list of client_ids');
  }
  return c;
}

function generateJwks() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  return {
    keys: [
      { ...rsa, use: 'sig', alg: 'RS256', kid: `rs256-${crypto.randomBytes(6).toString('hex')}` },
      { ...ec, use: 'sig', alg: 'ES256', kid: `es256-${crypto.randomBytes(6).toString('hex')}` },
    ],
  };
}

function clientMetadata(client) {
  const out = {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    ...client,
  };
  if (out.backchannel_logout_uri && out.backchannel_logout_session_required === undefined) {
    out.backchannel_logout_session_required = true;
  }
  if (!out.backchannel_logout_uri) {
    delete out.backchannel_logout_uri;
    delete out.backchannel_logout_session_required;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Storage: an in-memory adapter (like oidc-provider's own, without its 1000-entry LRU cap)
// that can also list live sessions, for /__test/backchannel-logout.

const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);

class Store {
  constructor() {
    this.entries = new Map(); // key -> {value, expiresAt}
    this.sweeper = setInterval(() => this.sweep(), 30_000).unref();
  }

  get(key) {
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      this.entries.delete(key);
      return undefined;
    }
    return entry.value;
  }

  set(key, value, ttlSeconds) {
    const expiresAt = typeof ttlSeconds === 'number' ? Date.now() + ttlSeconds * 1000 : Infinity;
    this.entries.set(key, { value, expiresAt });
  }

  delete(key) {
    this.entries.delete(key);
  }

  sweep() {
    const now = Date.now();
    for (const [key, entry] of this.entries) {
      if (entry.expiresAt <= now) this.entries.delete(key);
    }
  }

  *valuesWithPrefix(prefix) {
    for (const key of this.entries.keys()) {
      if (key.startsWith(prefix)) {
        const value = this.get(key);
        if (value !== undefined) yield value;
      }
    }
  }
}

const store = new Store();

class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    store.set(key, payload, expiresIn);
    if (this.model === 'Session') store.set(`sessionUid:${payload.uid}`, id, expiresIn);
    if (payload.userCode) store.set(`userCode:${payload.userCode}`, id, expiresIn);
    if (GRANTABLE.has(this.model) && payload.grantId) {
      const grantKey = `grant:${payload.grantId}`;
      const members = store.get(grantKey) ?? new Set();
      members.add(key);
      store.set(grantKey, members); // members expire with their own entries
    }
  }

  async find(id) {
    return store.get(this.key(id));
  }

  async findByUid(uid) {
    const id = store.get(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = store.get(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = store.get(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    const payload = store.get(this.key(id));
    store.delete(this.key(id));
    if (payload?.uid && store.get(`sessionUid:${payload.uid}`) === id) store.delete(`sessionUid:${payload.uid}`);
  }

  async revokeByGrantId(grantId) {
    const grantKey = `grant:${grantId}`;
    const members = store.get(grantKey);
    if (!members) return;
    for (const key of members) {
      if (key.startsWith(`${this.model}:`)) {
        store.delete(key);
        members.delete(key);
      }
    }
    if (members.size === 0) store.delete(grantKey);
  }
}

// ---------------------------------------------------------------------------------------
// Accounts: any login name is an account.

function accountClaims(login) {
  const local = login.includes('@') ? login.slice(0, login.indexOf('@')) : login;
  const name = local
    .split(/[._\s-]+/)
    .filter(Boolean)
    .map((part) => part[0].toUpperCase() + part.slice(1))
    .join(' ') || login;
  return {
    sub: login,
    name,
    preferred_username: login,
    email: login.includes('@') ? login : `${local.replace(/\s+/g, '.')}@example.test`,
    email_verified: true,
  };
}

// ---------------------------------------------------------------------------------------
// Test instrumentation.

function emptyStats() {
  return {
    token_requests: 0, // every POST to the token endpoint, injected failures included
    grants: {}, // grant_type -> successful token responses
    errors: {}, // error code -> failed token requests (provider errors only)
    errors_by_grant_type: {}, // grant_type -> {error code -> n}
    injected: { status: 0, hang: 0, delay: 0 },
    authorizations: 0, // codes issued at the authorization endpoint
    revocations: 0,
    introspections: 0,
    end_sessions: 0,
    backchannel_logout: { success: 0, error: 0 },
  };
}

let stats = emptyStats();
let behaviour = {};
const hanging = new Set(); // release functions of hung token requests

function releaseHanging() {
  for (const release of hanging) release();
  hanging.clear();
}

// code_challenge -> expiry (ms) of authorization requests that asked for offline_access
const offlineChallenges = new Map();

function rememberOffline(challenge, ttlSeconds) {
  const now = Date.now();
  for (const [key, expiresAt] of offlineChallenges) {
    if (expiresAt <= now) offlineChallenges.delete(key);
  }
  offlineChallenges.set(challenge, now + ttlSeconds * 1000);
}

function offlineRequested(code) {
  if (code.scopes.has('offline_access')) return true;
  const expiresAt = code.codeChallenge && offlineChallenges.get(code.codeChallenge);
  return Boolean(expiresAt && expiresAt > Date.now());
}

function describe(err) {
  return err.error_description ? `${err.message}: ${err.error_description}` : err.message;
}

function bump(obj, key, by = 1) {
  obj[key] = (obj[key] ?? 0) + by;
}

function loopback(hostname) {
  const h = hostname.replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

async function readRaw(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(ctx) {
  const raw = await readRaw(ctx.req);
  if (!raw.trim()) return {};
  const value = JSON.parse(raw);
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new Error('expected a JSON object');
  }
  return value;
}

function json(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.set('cache-control', 'no-store');
  ctx.body = JSON.stringify(body);
}

function validateBehaviour(b) {
  const out = {};
  if (b.delay_ms != null) {
    if (!Number.isSafeInteger(b.delay_ms) || b.delay_ms < 0) throw new Error('delay_ms must be a non-negative integer');
    if (b.delay_ms > 0) out.delay_ms = b.delay_ms;
  }
  if (b.status != null) {
    if (!Number.isSafeInteger(b.status) || b.status < 400 || b.status > 599) throw new Error('status must be 400..599 or null');
    out.status = b.status;
  }
  if (b.error != null) {
    if (typeof b.error !== 'string') throw new Error('error must be a string');
    out.error = b.error;
  }
  if (b.hang != null) {
    if (typeof b.hang !== 'boolean') throw new Error('hang must be a boolean');
    if (b.hang) out.hang = true;
  }
  if (b.grant_type != null) {
    if (typeof b.grant_type !== 'string') throw new Error('grant_type must be a string');
    out.grant_type = b.grant_type;
  }
  if (b.times != null) {
    if (!Number.isSafeInteger(b.times) || b.times <= 0) throw new Error('times must be a positive integer or null');
    out.times = b.times;
  }
  const unknown = Object.keys(b).filter((k) => !['delay_ms', 'status', 'error', 'hang', 'grant_type', 'times'].includes(k));
  if (unknown.length) throw new Error(`unknown keys: ${unknown.join(', ')}`);
  return out;
}

function listSessions(sub) {
  const out = [];
  for (const session of store.valuesWithPrefix('Session:')) {
    if (!session.accountId || (sub !== undefined && session.accountId !== sub)) continue;
    const clients = {};
    for (const [clientId, auth] of Object.entries(session.authorizations ?? {})) {
      clients[clientId] = { sid: auth.sid ?? null, grant_id: auth.grantId ?? null };
    }
    out.push({ sub: session.accountId, session_id: session.jti, session_uid: session.uid, clients });
  }
  return out;
}

// ---------------------------------------------------------------------------------------

async function main() {
  const c = loadConfig();
  const ready = { handler: null };
  const server = http.createServer((req, res) => ready.handler(req, res));
  server.keepAliveTimeout = 5_000;

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(c.port, c.host, resolve);
  });
  const { port } = server.address();
  const hostForUrl = c.host.includes(':') ? `[${c.host}]` : c.host;
  const issuer = c.issuer ?? `http://${hostForUrl}:${port}`;

  const resourceServer = {
    scope: c.resource_scopes,
    audience: c.resource,
    accessTokenTTL: c.access_token_ttl,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
  const opaqueResourceServer = {
    scope: c.resource_scopes,
    audience: c.opaque_resource,
    accessTokenTTL: c.access_token_ttl,
    accessTokenFormat: 'opaque',
  };
  const introspectors = new Set(c.introspectors);

  const configuration = {
    adapter: TestAdapter,
    // Clients live in the adapter (not `clients`), so /__test/clients can change them.
    clients: [],
    jwks: c.jwks ?? generateJwks(),
    cookies: {
      keys: c.cookie_keys ?? [crypto.randomBytes(32).toString('base64url')],
    },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return accountClaims(id);
        },
      };
    },
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    // Profile/email claims go into the ID token too (the BFF reads them from there;
    // the JWT access token is for the API, not for userinfo).
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    rotateRefreshToken: true,
    // oidc-provider drops offline_access from an authorization request without
    // prompt=consent (OIDC Core 11). Most IdPs do not, and tokengate does not send
    // prompt=consent: so a request that asked for offline_access is remembered (by its
    // PKCE code_challenge, see the middleware) and treated as if offline_access had been
    // granted: a refresh token, not tied to the IdP session.
    async issueRefreshToken(ctx, client, code) {
      return client.grantTypeAllowed('refresh_token') && offlineRequested(code);
    },
    async expiresWithSession(ctx, code) {
      return !offlineRequested(code);
    },
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? c.access_token_ttl,
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? c.access_token_ttl,
      AuthorizationCode: c.authorization_code_ttl,
      IdToken: c.id_token_ttl,
      RefreshToken: c.refresh_token_ttl,
      Interaction: c.interaction_ttl,
      Session: c.session_ttl,
      Grant: c.grant_ttl,
    },
    features: {
      devInteractions: { enabled: true },
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
      },
      introspection: {
        enabled: true,
        // A resource server (`introspectors`) asks about tokens issued to other clients.
        allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId
          || introspectors.has(client.clientId),
      },
      clientCredentials: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      backchannelLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        async defaultResource(ctx, client, oneOf) {
          if (oneOf) return oneOf.includes(c.resource) ? c.resource : oneOf[0];
          return c.resource;
        },
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(ctx, resourceIndicator) {
          if (resourceIndicator === c.resource) return resourceServer;
          if (c.opaque_resource !== null && resourceIndicator === c.opaque_resource) {
            return opaqueResourceServer;
          }
          throw new errors.InvalidTarget();
        },
      },
    },
    // oidc-provider guards outgoing requests against special-use addresses (SSRF); the
    // RPs of the tests live on loopback, so let loopback through and keep the guard for
    // everything else.
    fetch(url, options) {
      if (loopback(new URL(url).hostname)) {
        delete options.dispatcher;
      }
      return globalThis.fetch(url, options);
    },
    renderError(ctx, out) {
      ctx.type = 'application/json';
      ctx.body = out;
    },
  };

  const provider = new Provider(issuer, configuration);
  const tokenPath = '/token'; // oidc-provider's default routes

  provider.on('grant.success', (ctx) => {
    bump(stats.grants, ctx.oidc.params?.grant_type ?? 'unknown');
  });
  provider.on('grant.error', (ctx, err) => {
    const code = err.error ?? 'server_error';
    const gt = ctx.oidc?.params?.grant_type ?? ctx.state.grantType ?? 'unknown';
    bump(stats.errors, code);
    stats.errors_by_grant_type[gt] ??= {};
    bump(stats.errors_by_grant_type[gt], code);
  });
  provider.on('server_error', (ctx, err) => {
    if (ctx.path === tokenPath) {
      bump(stats.errors, 'server_error');
    }
    console.error('server_error', ctx.method, ctx.path, err);
  });
  provider.on('authorization.success', () => { stats.authorizations += 1; });
  provider.on('end_session.success', () => { stats.end_sessions += 1; });
  provider.on('backchannel.success', () => { stats.backchannel_logout.success += 1; });
  provider.on('backchannel.error', (ctx, err, client) => {
    stats.backchannel_logout.error += 1;
    console.error(`back-channel logout to ${client.clientId} failed: ${err.message}`);
  });

  provider.use(async (ctx, next) => {
    if (ctx.path.startsWith('/__test/')) {
      try {
        await testEndpoint(ctx);
      } catch (err) {
        json(ctx, 400, { error: 'invalid_request', error_description: describe(err) });
      }
      return;
    }
    if (ctx.path === '/auth' && ctx.method === 'GET') {
      const { scope, code_challenge: challenge } = ctx.query;
      if (typeof scope === 'string' && scope.split(' ').includes('offline_access')
          && typeof challenge === 'string' && challenge) {
        rememberOffline(challenge, c.interaction_ttl + c.authorization_code_ttl);
      }
    }
    if (ctx.path === '/token/revocation' && ctx.method === 'POST') stats.revocations += 1;
    if (ctx.path === '/token/introspection' && ctx.method === 'POST') stats.introspections += 1;
    if (ctx.path === tokenPath && ctx.method === 'POST') {
      await tokenEndpoint(ctx, next);
      return;
    }
    await next();
  });

  async function tokenEndpoint(ctx, next) {
    stats.token_requests += 1;
    // Read the body here to learn the grant_type; oidc-provider then takes the
    // already-read body from ctx.req.body (its documented fallback for parsed bodies).
    // Headers are left as they came: Authorization, and DPoP (the proof's htu is the
    // token endpoint's URL, which this does not change).
    const raw = await readRaw(ctx.req);
    ctx.req.body = raw;
    const grantType = new URLSearchParams(raw).get('grant_type') ?? 'unknown';
    ctx.state.grantType = grantType;

    const b = behaviour;
    const applies = Object.keys(b).length > 0 && (!b.grant_type || b.grant_type === grantType);
    if (applies && b.times !== undefined) {
      b.times -= 1;
      if (b.times <= 0) behaviour = {};
    }
    if (applies && b.delay_ms) {
      stats.injected.delay += 1;
      await sleep(b.delay_ms);
    }
    if (applies && b.hang) {
      stats.injected.hang += 1;
      const released = await new Promise((resolve) => {
        const release = () => resolve(true);
        hanging.add(release);
        ctx.res.once('close', () => {
          hanging.delete(release);
          resolve(false);
        });
      });
      if (!released) {
        ctx.respond = false; // the client is gone
        return;
      }
      json(ctx, 503, { error: 'temporarily_unavailable', error_description: 'hung request released by /__test' });
      return;
    }
    if (applies && b.status) {
      stats.injected.status += 1;
      const error = b.error ?? (b.status >= 500 ? 'temporarily_unavailable' : 'invalid_request');
      json(ctx, b.status, { error, error_description: 'injected by /__test/token-behaviour' });
      return;
    }
    await next();
  }

  async function testControl(ctx) {
    const route = `${ctx.method} ${ctx.path}`;
    switch (route) {
      case 'GET /__test/stats':
        return json(ctx, 200, stats);
      case 'POST /__test/reset':
        stats = emptyStats();
        behaviour = {};
        releaseHanging();
        return json(ctx, 200, { ok: true });
      case 'GET /__test/token-behaviour':
        return json(ctx, 200, behaviour);
      case 'POST /__test/token-behaviour':
        behaviour = validateBehaviour(await readJson(ctx));
        if (!behaviour.hang) releaseHanging();
        return json(ctx, 200, behaviour);
      case 'GET /__test/sessions':
        return json(ctx, 200, listSessions(ctx.query.sub));
      case 'POST /__test/backchannel-logout':
        return json(ctx, 200, await backchannelLogout(await readJson(ctx)));
      default:
        return json(ctx, 404, { error: 'not_found', error_description: route });
    }
  }

  async function backchannelLogout(body) {
    const { sub, sid = null, client_id: onlyClient = null, end_session: endSession = true } = body;
    if (typeof sub !== 'string' || !sub) throw new Error('sub is required');
    const sessions = listSessions(sub).filter(
      (s) => sid === null || Object.values(s.clients).some((a) => a.sid === sid),
    );
    const deliveries = [];
    for (const s of sessions) {
      for (const [clientId, auth] of Object.entries(s.clients)) {
        if (onlyClient !== null && clientId !== onlyClient) continue;
        const client = await provider.Client.find(clientId);
        if (!client?.backchannelLogoutUri) continue;
        try {
          await client.backchannelLogout(sub, auth.sid);
          stats.backchannel_logout.success += 1;
          deliveries.push({ client_id: clientId, sid: auth.sid, ok: true });
        } catch (err) {
          stats.backchannel_logout.error += 1;
          deliveries.push({ client_id: clientId, sid: auth.sid, ok: false, error: err.message });
        }
      }
      if (endSession) {
        for (const [clientId, auth] of Object.entries(s.clients)) {
          if (onlyClient !== null && clientId !== onlyClient) continue;
          if (auth.grant_id) {
            await Promise.all([
              provider.AccessToken.adapter.revokeByGrantId(auth.grant_id),
              provider.RefreshToken.adapter.revokeByGrantId(auth.grant_id),
              provider.AuthorizationCode.adapter.revokeByGrantId(auth.grant_id),
              provider.Grant.adapter.destroy(auth.grant_id),
            ]);
          }
        }
        if (onlyClient === null) {
          await provider.Session.adapter.destroy(s.session_id);
        } else {
          const session = await provider.Session.adapter.find(s.session_id);
          if (session?.authorizations) delete session.authorizations[onlyClient];
        }
      }
    }
    return { sessions: sessions.length, deliveries };
  }

  async function putClient(metadata) {
    if (typeof metadata.client_id !== 'string' || !metadata.client_id) {
      throw new Error('client_id is required');
    }
    const existing = await provider.Client.adapter.find(metadata.client_id);
    const merged = clientMetadata({ ...(existing ?? {}), ...metadata });
    for (const [key, value] of Object.entries(merged)) {
      if (value === null) delete merged[key];
    }
    // Validate first: a bad client is refused here, not at its first request.
    await provider.Client.validate(merged);
    await provider.Client.adapter.upsert(merged.client_id, merged);
    return merged;
  }

  async function testEndpoint(ctx) {
    if (ctx.method === 'POST' && ctx.path === '/__test/clients') {
      const client = await putClient(await readJson(ctx));
      return json(ctx, 200, { client_id: client.client_id });
    }
    if (ctx.method === 'GET' && ctx.path.startsWith('/__test/clients/')) {
      const found = await provider.Client.adapter.find(decodeURIComponent(ctx.path.slice(16)));
      return found ? json(ctx, 200, found) : json(ctx, 404, { error: 'not_found' });
    }
    return testControl(ctx);
  }

  for (const client of c.clients) {
    try {
      await putClient(client);
    } catch (err) {
      fail(`invalid client ${JSON.stringify(client.client_id)}: ${describe(err)}`);
    }
  }

  ready.handler = provider.callback();

  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    releaseHanging();
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2_000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);

  process.stdout.write(`READY ${port}\n`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
