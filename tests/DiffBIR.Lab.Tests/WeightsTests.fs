/// `weights fetch` against a local HTTP server on 127.0.0.1: progress, resume after a cut connection, checksums.
module DiffBIR.Lab.Tests.WeightsTests

open System
open System.IO
open System.Net
open System.Net.Sockets
open System.Threading
open System.Threading.Tasks
open Xunit
open FsUnit.Xunit
open DiffBIR.Lab.Weights
open DiffBIR.Lab.Tests.TestSupport

let private payload = Array.init 300_000 (fun i -> byte ((i * 31 + i / 7) % 251))
let private sha (b: byte[]) = Convert.ToHexStringLower(Security.Cryptography.SHA256.HashData b)

/// Serves `payload` at /file.bin; the first full (non-range) request is cut after `cutAfter` bytes when set.
type private Server(cutFirstAfter: int option) =
    let port =
        let l = new TcpListener(IPAddress.Loopback, 0)
        l.Start()
        let p = (l.LocalEndpoint :?> IPEndPoint).Port
        l.Stop()
        p
    let listener = new HttpListener()
    do listener.Prefixes.Add(sprintf "http://127.0.0.1:%d/" port)
    do listener.Start()
    let mutable requests = 0
    let mutable ranges = []
    let cts = new CancellationTokenSource()
    let loop =
        Task.Run(fun () ->
            let mutable cut = cutFirstAfter
            while not cts.IsCancellationRequested do
                let ctx = try Some(listener.GetContext()) with _ -> None
                match ctx with
                | None -> ()
                | Some ctx ->
                    requests <- requests + 1
                    let range = ctx.Request.Headers.["Range"]
                    ranges <- (if isNull range then "" else range) :: ranges
                    let start =
                        if isNull range then 0
                        else int (range.Replace("bytes=", "").TrimEnd('-'))
                    let resp = ctx.Response
                    if start > 0 then
                        resp.StatusCode <- 206
                        resp.Headers.Add("Content-Range", sprintf "bytes %d-%d/%d" start (payload.Length - 1) payload.Length)
                    resp.ContentLength64 <- int64 (payload.Length - start)
                    match cut with
                    | Some n when start = 0 ->
                        cut <- None
                        resp.OutputStream.Write(payload, 0, n)
                        resp.OutputStream.Flush()
                        resp.Abort() // the connection drops mid-file
                    | _ ->
                        resp.OutputStream.Write(payload, start, payload.Length - start)
                        resp.Close())
    member _.Url = sprintf "http://127.0.0.1:%d/file.bin" port
    member _.Requests = requests
    member _.Ranges = List.rev ranges
    interface IDisposable with
        member _.Dispose() =
            cts.Cancel()
            listener.Stop()
            listener.Close()

let private entry url (sha256: string) =
    WeightFile("test", "test.pth", url, Nullable(int64 payload.Length), sha256, "torch-zip", "nothing", "test")

[<Fact>]
let ``a cut connection leaves a .part file and the next fetch resumes with a Range request`` () =
    use dir = new TempDir()
    use server = new Server(Some 100_000)
    let fetcher = WeightsFetcher(dir.Path)
    let f = entry server.Url (sha payload)
    let e = Assert.ThrowsAny<WeightsFetchException>(fun () -> fetcher.FetchAsync(f).GetAwaiter().GetResult() |> ignore)
    e.Message |> should haveSubstring "resume"
    File.Exists(dir.File "test.pth") |> should be False
    let partLen = FileInfo(dir.File "test.pth.part").Length
    partLen |> should be (greaterThan 0L)
    let r = fetcher.FetchAsync(f).GetAwaiter().GetResult()
    r.Resumed |> should be True
    r.Sha256 |> should equal (sha payload)
    File.ReadAllBytes(dir.File "test.pth") |> should equal payload
    File.Exists(dir.File "test.pth.part") |> should be False
    server.Ranges |> List.last |> should equal (sprintf "bytes=%d-" partLen)
    // a second fetch finds the file and checks it without downloading
    let again = fetcher.FetchAsync(f).GetAwaiter().GetResult()
    again.AlreadyPresent |> should be True

[<Fact>]
let ``a download whose SHA-256 does not match is discarded`` () =
    use dir = new TempDir()
    use server = new Server(None)
    let f = entry server.Url (String('0', 64))
    let e = Assert.ThrowsAny<WeightsFetchException>(fun () -> WeightsFetcher(dir.Path).FetchAsync(f).GetAwaiter().GetResult() |> ignore)
    e.Message |> should haveSubstring "SHA-256"
    Directory.GetFiles dir.Path |> should be Empty

[<Fact>]
let ``without a known checksum the first download records one and later fetches enforce it`` () =
    use dir = new TempDir()
    use server = new Server(None)
    let f = entry server.Url null
    let fetcher = WeightsFetcher(dir.Path)
    fetcher.FetchAsync(f).GetAwaiter().GetResult() |> ignore
    fetcher.ExpectedSha256 f |> should equal (sha payload)
    File.WriteAllBytes(dir.File "test.pth", Array.append payload [| 1uy |])
    Assert.ThrowsAny<WeightsFetchException>(fun () -> fetcher.FetchAsync(f).GetAwaiter().GetResult() |> ignore).Message
    |> should haveSubstring "does not match"

[<Fact>]
let ``offline gives a clear error naming the file`` () =
    use dir = new TempDir()
    let port =
        let l = new TcpListener(IPAddress.Loopback, 0)
        l.Start()
        let p = (l.LocalEndpoint :?> IPEndPoint).Port
        l.Stop()
        p
    let f = entry (sprintf "http://127.0.0.1:%d/nothing.bin" port) null
    let e = Assert.ThrowsAny<WeightsFetchException>(fun () -> WeightsFetcher(dir.Path).FetchAsync(f).GetAwaiter().GetResult() |> ignore)
    e.Message |> should haveSubstring "test.pth"
    e.Message |> should haveSubstring "offline"
