//! Control exchanges: one frame each way on a fresh bidirectional stream.

use postern_proto::codec::{self, CodecError, LEN_PREFIX, MAX_FRAME_LEN};
use postern_proto::msg::{Ctl, Refusal};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;

/// How long a peer may take to answer one control request.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed early: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("message larger than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    #[error("peer did not answer within {0:?}")]
    Timeout(Duration),
    /// The peer answered, with a refusal: [`Refusal::is_permanent`] says whether asking again
    /// soon can help.
    #[error("{0}")]
    Refused(Refusal),
}

impl From<quinn::ReadToEndError> for CtlError {
    fn from(e: quinn::ReadToEndError) -> Self {
        match e {
            quinn::ReadToEndError::Read(r) => CtlError::Read(r),
            quinn::ReadToEndError::TooLong => CtlError::TooLong,
        }
    }
}

impl From<quinn::ReadExactError> for CtlError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(r) => CtlError::Read(r),
            quinn::ReadExactError::FinishedEarly(_) => CtlError::Codec(CodecError::Truncated),
        }
    }
}

/// Reads a whole stream that must hold exactly one frame.
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, CtlError> {
    let buf = recv.read_to_end(LEN_PREFIX + MAX_FRAME_LEN).await?;
    Ok(codec::decode_exact(&buf)?)
}

/// Reads one frame from the start of a stream that goes on with other bytes afterwards.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, CtlError> {
    let mut prefix = [0u8; LEN_PREFIX];
    recv.read_exact(&mut prefix).await?;
    let len = codec::check_prefix(&prefix)?.ok_or(CodecError::Truncated)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(codec::decode_body(&body)?)
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), CtlError> {
    let frame = codec::to_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Writes one frame and finishes the stream.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), CtlError> {
    write_frame(send, msg).await?;
    send.finish()?;
    Ok(())
}

/// Sends `msg` on a new stream and waits (at most `timeout`) for the one-frame answer.
pub async fn request(
    conn: &quinn::Connection,
    msg: &Ctl,
    timeout: Duration,
) -> Result<Ctl, CtlError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, msg).await?;
        read_message::<Ctl>(&mut recv).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CtlError::Timeout(timeout))?
}
