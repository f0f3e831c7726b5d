// A real OpenID provider (the npm package `oidc-provider`, pinned in package.json) on
// 127.0.0.1 for tests/oidc_provider.rs: client_credentials clients registered with the
// RFC 7591 token_endpoint_auth_method each test asks for, and token introspection (RFC 7662)
// so the test can check the tokens the sink received.
//
// Environment: OIDC_PROVIDER_MODULES = the node_modules directory holding oidc-provider;
// OIDC_CLIENTS = JSON array of {client_id, client_secret, token_endpoint_auth_method}.
// Prints one JSON line {"port": N} on stdout once listening; runs until killed.
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const modules = process.env.OIDC_PROVIDER_MODULES;
const { default: Provider } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href
);
const clients = JSON.parse(process.env.OIDC_CLIENTS).map((client) => ({
  ...client,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  scope: 'events.write',
}));

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients,
  scopes: ['events.write'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true, allowedPolicy: async () => true },
  },
  ttl: { ClientCredentials: 600 },
});
provider.on('grant.error', (ctx, error) => {
  console.error(`grant.error ${error.error}: ${error.error_description}`);
});
server.on('request', provider.callback());
console.log(JSON.stringify({ port }));
