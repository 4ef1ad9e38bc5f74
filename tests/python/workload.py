"""Talks to a Sigil agent with py-spiffe, as any Python workload would, and prints what it got as
JSON for the Rust test to check. The socket comes from SPIFFE_ENDPOINT_SOCKET."""

import json
import os

from spiffe import WorkloadApiClient

result = {}
with WorkloadApiClient(socket_path=os.environ["SPIFFE_ENDPOINT_SOCKET"]) as client:
    svid = client.fetch_x509_svid(timeout=30)
    result["x509_spiffe_id"] = str(svid.spiffe_id)
    result["x509_chain_length"] = len(svid.cert_chain)
    bundles = client.fetch_x509_bundles(timeout=30)
    result["x509_trust_domains"] = sorted(str(bundle.trust_domain) for bundle in bundles.bundles)
    jwt = client.fetch_jwt_svid(audience={"python"}, timeout=30)
    result["jwt_spiffe_id"] = str(jwt.spiffe_id)
    validated = client.validate_jwt_svid(jwt.token, "python", timeout=30)
    result["validated_spiffe_id"] = str(validated.spiffe_id)
    try:
        client.validate_jwt_svid(jwt.token, "someone-else", timeout=30)
        result["wrong_audience"] = "accepted"
    except Exception as error:  # py-spiffe raises its own error types; any refusal is right here
        result["wrong_audience"] = type(error).__name__
    jwt_bundles = client.fetch_jwt_bundles(timeout=30)
    result["jwt_trust_domains"] = sorted(str(bundle.trust_domain) for bundle in jwt_bundles.bundles)

print(json.dumps(result))
