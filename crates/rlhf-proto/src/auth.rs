//! The per-run secret token. The coordinator generates it, hands it to the workers it starts
//! through the environment ([`TOKEN_ENV`]), and every RPC in either direction carries it in the
//! [`TOKEN_HEADER`] metadata entry. Servers refuse calls without the right token with
//! `Unauthenticated`. The token is never logged: [`RunToken`]'s `Debug` prints a redaction.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Metadata key carrying the token.
pub const TOKEN_HEADER: &str = "x-rlhf-token";
/// Environment variable through which a worker receives the token.
pub const TOKEN_ENV: &str = "RLHF_RUN_TOKEN";

/// A run's secret: 32 hex characters (128 bits) from the OS random source.
#[derive(Clone, PartialEq, Eq)]
pub struct RunToken(String);

impl std::fmt::Debug for RunToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunToken(<redacted>)")
    }
}

impl RunToken {
    /// Wraps a token received from elsewhere; it must be non-empty visible ASCII.
    pub fn new(token: String) -> Result<RunToken, String> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the run token must be non-empty printable ASCII".into());
        }
        Ok(RunToken(token))
    }

    /// Reads [`TOKEN_ENV`].
    pub fn from_env() -> Result<RunToken, String> {
        let t = std::env::var(TOKEN_ENV).map_err(|_| {
            format!("{TOKEN_ENV} is not set; workers are started by rlhf-coord, which sets it")
        })?;
        RunToken::new(t)
    }

    /// A fresh random token.
    pub fn generate() -> std::io::Result<RunToken> {
        let mut bytes = [0u8; 16];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(RunToken(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The secret itself, for handing to a child process's environment.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, so the time a refusal takes says nothing about the token.
    fn matches(&self, other: &[u8]) -> bool {
        let a = self.0.as_bytes();
        a.len() == other.len() && a.iter().zip(other).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Server side: refuses requests without the run token.
#[derive(Clone, Debug)]
pub struct CheckToken(pub RunToken);

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get(TOKEN_HEADER) {
            Some(v) if self.0.matches(v.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong run token")),
            None => Err(Status::unauthenticated(format!(
                "missing run token: calls must carry the `{TOKEN_HEADER}` metadata entry"
            ))),
        }
    }
}

/// Client side: adds the run token to every request.
#[derive(Clone, Debug)]
pub struct AddToken(pub RunToken);

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let v = MetadataValue::try_from(self.0.expose())
            .map_err(|_| Status::internal("run token is not valid metadata"))?;
        req.metadata_mut().insert(TOKEN_HEADER, v);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_missing_and_wrong_tokens() {
        let t = RunToken::generate().unwrap();
        assert_eq!(t.expose().len(), 32);
        assert_eq!(format!("{t:?}"), "RunToken(<redacted>)");
        let mut check = CheckToken(t.clone());
        let e = check.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains(TOKEN_HEADER));
        let other = RunToken::new("0".repeat(32)).unwrap();
        let req = AddToken(other).call(Request::new(())).unwrap();
        assert_eq!(
            check.call(req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let req = AddToken(t).call(Request::new(())).unwrap();
        assert!(check.call(req).is_ok());
        assert!(RunToken::new("has space".into()).is_err());
    }
}
