// A real OpenID Connect provider for tests/test_accounts_oidc.py: npm's oidc-provider (panva), with its
// development sign-in screens (any login name, any password) and one client, saescope's.
// usage: node oidc_provider.mjs PORT REDIRECT_URI CLIENT_SECRET
import Provider from "oidc-provider";

const [port, redirectUri, secret] = process.argv.slice(2);
const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [
    {
      client_id: "saescope",
      client_secret: secret,
      redirect_uris: [redirectUri],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  claims: { openid: ["sub"], profile: ["preferred_username", "name"], email: ["email"] },
  async findAccount(ctx, id) {
    return { accountId: id, async claims() { return { sub: id, preferred_username: id, name: id, email: `${id}@example.org` }; } };
  },
  conformIdTokenClaims: false, // the profile claims in the ID token, so saescope needs no userinfo call
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
});
provider.listen(Number(port), "127.0.0.1", () => console.log("ready"));
