//! `floor`: the HTTP floor of this machine — a bare hyper server answering every request with a
//! fixed prediction-shaped body, with the same runtime and connection settings as modelgate, so
//! the side-by-side runner can show what HTTP alone costs. With `--echo` it answers the body's
//! `request` inside the success envelope instead, as an echo model through modelgate does: what
//! HTTP alone costs for a large body each way (`loadtests/large-answers.sh`).

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
struct Args {
    /// Address to listen on (use 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1:18900")]
    listen: String,
    /// Answer each body's `request` (found with serde_json, not copied) in the success
    /// envelope, sent as three pieces, rather than a fixed answer.
    #[arg(long)]
    echo: bool,
}

/// A body of a few pieces, sent as they are, with its length known.
struct Pieces(std::collections::VecDeque<Bytes>);

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(
            self.get_mut()
                .0
                .pop_front()
                .map(|b| Ok(hyper::body::Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

async fn answer(
    req: Request<Incoming>,
    echo: bool,
) -> Result<Response<Either<Full<Bytes>, Pieces>>, Infallible> {
    // Read the body, as a real endpoint must, then answer.
    let collected = req.into_body().collect().await;
    let fixed = || {
        Either::Left(Full::new(Bytes::from_static(
            modelgate_loadtests::FIXED_ANSWER,
        )))
    };
    let answer = match collected {
        Ok(collected) if echo => {
            let body = collected.to_bytes();
            match serde_json::from_slice::<modelgate_loadtests::Envelope>(&body) {
                Ok(envelope) => {
                    // `request` borrows from the body: where it starts there, and how long it is.
                    let raw = envelope.request.get();
                    let start = raw.as_ptr() as usize - body.as_ptr() as usize;
                    Either::Right(Pieces(
                        [
                            Bytes::from_static(br#"{"success":true,"response":"#),
                            body.slice(start..start + raw.len()),
                            Bytes::from_static(br#","replicaId":"floor-0"}"#),
                        ]
                        .into(),
                    ))
                }
                Err(_) => fixed(),
            }
        }
        _ => fixed(),
    };
    let mut resp = Response::new(answer);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn main() {
    modelgate_loadtests::allocator_like_modelgate("floor");
    modelgate_loadtests::server_runtime().block_on(serve());
}

async fn serve() {
    let args = Args::parse();
    let echo = args.echo;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .expect("bind");
    println!(
        "floor listening on http://{}",
        listener.local_addr().expect("addr")
    );
    let serve = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(move |req| answer(req, echo)),
                    )
                    .await;
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = modelgate_loadtests::stopped() => {}
    }
}
