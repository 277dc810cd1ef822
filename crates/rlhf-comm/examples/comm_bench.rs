//! Bandwidth of the TCP collectives between two OS processes on loopback, against a plain
//! single-stream TCP copy between the same two processes measured in the same run (the "raw"
//! baseline). Run through `scripts/bench/comm_bench.sh`; not part of the test suite.
//!
//! Without arguments this is the launcher: it picks three free loopback ports and starts itself
//! twice as ranks 0 and 1 (`--rank R --addrs A0,A1 --raw ADDR --max-mib N`); rank 0 prints a
//! markdown table. Sizes are 1 MiB, 4 MiB, ... up to `--max-mib` (default 1024). For each size
//! every measurement runs the same number of back-to-back operations between two barriers:
//! broadcast from rank 0 (bus bandwidth = size / time), all-reduce sum of f32 (bus bandwidth =
//! 2(n-1)/n × size / time), and the raw copy (rank 0 writes the bytes with `write_all` on one
//! TCP_NODELAY socket, rank 1 `read_exact`s them and acknowledges the batch with one byte).
//! A last measurement copies in both directions at once on the raw socket: on loopback every
//! byte costs CPU copies, so with a ring all-reduce (each rank sending and receiving at once)
//! that, not the one-way copy, is the ceiling. `COMM_CHUNK_KIB` overrides the group's chunk size.

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::process::Command;
use std::time::{Duration, Instant};

use rlhf_comm::{bind, Collective, CollectiveKey, GroupConfig, ReduceOp, TcpGroup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Res<T> = Result<T, Box<dyn Error>>;

const MIB: usize = 1 << 20;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let max_mib: usize = get("--max-mib").map_or(Ok(1024), |s| s.parse())?;
    match get("--rank") {
        None => launch(max_mib),
        Some(rank) => {
            let addrs = get("--addrs")
                .ok_or("--addrs missing")?
                .split(',')
                .map(|a| a.parse())
                .collect::<Result<Vec<SocketAddr>, _>>()?;
            let raw: SocketAddr = get("--raw").ok_or("--raw missing")?.parse()?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(rank_main(rank.parse()?, addrs, raw, max_mib))
        }
    }
}

fn free_port() -> Res<SocketAddr> {
    Ok(StdListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?)
}

fn launch(max_mib: usize) -> Res<()> {
    let addrs = [free_port()?, free_port()?];
    let raw = free_port()?;
    let me = std::env::current_exe()?;
    let list = format!("{},{}", addrs[0], addrs[1]);
    let mut children = Vec::new();
    for rank in 0..2 {
        children.push(
            Command::new(&me)
                .args(["--rank", &rank.to_string(), "--addrs", &list])
                .args(["--raw", &raw.to_string(), "--max-mib", &max_mib.to_string()])
                .spawn()?,
        );
    }
    let mut failed = false;
    for mut c in children {
        failed |= !c.wait()?.success();
    }
    if failed {
        return Err("a rank failed".into());
    }
    Ok(())
}

async fn raw_link(rank: usize, raw: SocketAddr) -> Res<TcpStream> {
    let s = if rank == 1 {
        TcpListener::bind(raw).await?.accept().await?.0
    } else {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match TcpStream::connect(raw).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    s.set_nodelay(true)?;
    Ok(s)
}

/// `iters` single-stream copies of `buf` from rank 0 to rank 1, acknowledged once at the end.
async fn raw_copy(rank: usize, s: &mut TcpStream, buf: &mut [u8], iters: usize) -> Res<()> {
    let mut ack = [0u8; 1];
    if rank == 0 {
        for _ in 0..iters {
            s.write_all(buf).await?;
        }
        s.read_exact(&mut ack).await?;
    } else {
        for _ in 0..iters {
            s.read_exact(buf).await?;
        }
        s.write_all(&ack).await?;
    }
    Ok(())
}

/// `iters` copies of `send` in each direction at once on the same socket (full duplex): the
/// ceiling for a ring all-reduce on loopback, where every rank sends and receives at once.
async fn raw_both_ways(s: &mut TcpStream, send: &[u8], recv: &mut [u8], iters: usize) -> Res<()> {
    let (mut r, mut w) = s.split();
    tokio::try_join!(
        async {
            for _ in 0..iters {
                w.write_all(send).await?;
            }
            Ok::<(), std::io::Error>(())
        },
        async {
            for _ in 0..iters {
                r.read_exact(recv).await?;
            }
            Ok(())
        },
    )?;
    Ok(())
}

async fn rank_main(
    rank: usize,
    addrs: Vec<SocketAddr>,
    raw: SocketAddr,
    max_mib: usize,
) -> Res<()> {
    let mut cfg = GroupConfig::new(
        CollectiveKey::from_run_token(b"comm-bench"),
        1,
        rank,
        addrs.len(),
    );
    if let Ok(kib) = std::env::var("COMM_CHUNK_KIB") {
        cfg.chunk_bytes = kib.parse::<usize>()? * 1024;
    }
    let chunk = cfg.chunk_bytes;
    let listener = bind(addrs[rank]).await?;
    let (g, link) = tokio::join!(
        TcpGroup::connect(cfg, listener, addrs.clone()),
        raw_link(rank, raw)
    );
    let (mut g, mut link) = (g?, link?);
    let n = g.world() as f64;
    let mut floats = vec![0f32; max_mib * MIB / 4];
    let mut spare = vec![0u8; max_mib * MIB];
    if rank == 0 {
        println!(
            "world {}, loopback, two processes; chunk {} KiB; raw = single-stream tokio TCP copy between the same processes",
            g.world(),
            chunk / 1024
        );
        println!("| size | broadcast GB/s | all-reduce bus GB/s | raw TCP GB/s | broadcast / raw | all-reduce / raw | raw both ways GB/s per direction | all-reduce / raw both ways |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    }
    let mut size = MIB;
    while size <= max_mib * MIB {
        let iters = ((2048 * MIB) / size).clamp(3, 50);
        let buf = &mut floats[..size / 4];
        // Warm-up: one of each, untimed.
        g.broadcast_f32(0, buf).await?;
        g.all_reduce(buf, ReduceOp::Sum).await?;
        raw_copy(rank, &mut link, bytemuck::cast_slice_mut(buf), 1).await?;

        g.barrier().await?;
        let t = Instant::now();
        for _ in 0..iters {
            g.broadcast_f32(0, buf).await?;
        }
        g.barrier().await?;
        let bcast = (size * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;

        let t = Instant::now();
        for _ in 0..iters {
            g.all_reduce(buf, ReduceOp::Sum).await?;
        }
        g.barrier().await?;
        let ar = 2.0 * (n - 1.0) / n * (size * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;

        let t = Instant::now();
        raw_copy(rank, &mut link, bytemuck::cast_slice_mut(buf), iters).await?;
        g.barrier().await?;
        let rawbw = (size * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;

        let t = Instant::now();
        raw_both_ways(
            &mut link,
            bytemuck::cast_slice(buf),
            &mut spare[..size],
            iters,
        )
        .await?;
        g.barrier().await?;
        let duplex = (size * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;

        if rank == 0 {
            println!(
                "| {} MiB | {bcast:.2} | {ar:.2} | {rawbw:.2} | {:.0}% | {:.0}% | {duplex:.2} | {:.0}% |",
                size / MIB,
                100.0 * bcast / rawbw,
                100.0 * ar / rawbw,
                100.0 * ar / duplex
            );
        }
        size *= 4;
    }
    Ok(())
}
