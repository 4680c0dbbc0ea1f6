//! `floor`: the HTTP floor of this machine — a bare hyper server answering every request with a
//! fixed prediction-shaped body, with the same runtime and connection settings as modelgate, so
//! the side-by-side runner can show what HTTP alone costs.

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
struct Args {
    /// Address to listen on (use 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1:18900")]
    listen: String,
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body, as a real endpoint must, then answer.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from_static(
        modelgate_loadtests::FIXED_ANSWER,
    )));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn main() {
    modelgate_loadtests::server_runtime().block_on(serve());
}

async fn serve() {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .expect("bind");
    println!(
        "floor listening on http://{}",
        listener.local_addr().expect("addr")
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                .await;
        });
    }
}
