/// The metric registry (`Metric.Get`), its input checks, and `diffbir-lab metrics` on folders. No trained weights can
/// be downloaded here: PSNR / SSIM are checked on values, the learned metrics through the labelled random-weights mode.
module DiffBIR.Lab.Tests.MetricsRegistryTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open TorchSharp
open DiffBIR.Lab.Metrics
open DiffBIR.Lab.Tests.TestSupport
open DiffBIR.Lab.Tests.CliTests

let private noWeights (dir: TempDir) =
    let d = dir.File "weights"
    Directory.CreateDirectory d |> ignore
    d

/// A seeded uint8 NHWC image [1, h, w, 3].
let private randomUInt8 (seed: int64) h w =
    torch.randint(0L, 256L, [| 1L; int64 h; int64 w; 3L |], torch.ScalarType.Byte, generator = new torch.Generator(uint64 seed))

let private throwsWith<'e when 'e :> exn> (fragment: string) (f: unit -> obj) =
    let e = Assert.ThrowsAny<'e>(fun () -> f () |> ignore)
    e.Message |> should haveSubstring fragment

[<Fact>]
let ``the registry knows pyiqa's names, FR or NR, and which direction is better`` () =
    Metric.Names |> List.ofSeq |> should equal [ "psnr"; "ssim"; "lpips"; "lpips-vgg"; "musiq"; "musiq-ava"; "clipiqa"; "clipiqa+"; "maniqa"; "niqe-lab" ]
    for fr in [ "psnr"; "ssim"; "lpips"; "lpips-vgg" ] do
        (Metric.Describe fr).Kind |> should equal MetricKind.FullReference
    for nr in [ "musiq"; "musiq-ava"; "clipiqa"; "clipiqa+"; "maniqa" ] do
        (Metric.Describe nr).Kind |> should equal MetricKind.NoReference
    (Metric.Describe "lpips").HigherIsBetter |> should be False
    (Metric.Describe "lpips-vgg").HigherIsBetter |> should be False
    for up in [ "psnr"; "ssim"; "musiq"; "clipiqa"; "maniqa" ] do
        (Metric.Describe up).HigherIsBetter |> should be True
    (Metric.Describe "psnr").NeedsWeights |> should be False
    (Metric.Describe " MUSIQ ").Name |> should equal "musiq"
    (Metric.Describe "musiq").Weights |> Seq.map (fun w -> w.File) |> List.ofSeq |> should equal [ "musiq_koniq_ckpt-e95806b9.pth" ]
    (Metric.Describe "ssim").Source |> should haveSubstring "NOT pyiqa 'ssim'"
    throwsWith<ArgumentException> "unknown metric 'niqe'" (fun () -> box (Metric.Describe "niqe"))

[<Fact>]
let ``every weight file of every metric is in the manifest with an official URL`` () =
    let m = DiffBIR.Lab.Weights.WeightsManifest.Load(Path.Combine(repoRoot, "weights", "manifest.json"))
    for n in Metric.Names do
        for w in (Metric.Describe n).Weights do
            let f = m.[w.Id]
            f.File |> should equal w.File
            f.Url |> should startWith "https://"
            f.Url |> should endWith ("/" + w.File)
    // The OpenAI RN50 checksum is the URL's folder (what clip.load verifies).
    m.["clip_rn50"].Sha256 |> should equal "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"

[<Fact>]
let ``without weights a learned metric is unavailable and names the missing file`` () =
    use dir = new TempDir()
    let w = noWeights dir
    let e = Assert.Throws<MetricUnavailableException>(fun () -> Metric.Get("musiq", w) |> ignore)
    e.Message |> should haveSubstring "unavailable"
    e.Message |> should haveSubstring (Path.Combine(w, "musiq_koniq_ckpt-e95806b9.pth") + " missing")
    e.Message |> should haveSubstring "weights fetch metrics"
    e.FileName |> should equal (Path.Combine(w, "musiq_koniq_ckpt-e95806b9.pth"))
    let lp = Metric.Availability("lpips", w)
    lp.Available |> should be False
    lp.Reason |> should haveSubstring "LPIPS_v0.1_alex-df73285e.pth missing"
    lp.Reason |> should haveSubstring "alexnet-owt-7be5be79.pth missing"
    // psnr / ssim need nothing
    Metric.Availability("psnr", w).Available |> should be True
    // The OpenAI RN50 archive is TorchScript: present but unconverted, the reason says how to convert it.
    File.WriteAllBytes(Path.Combine(w, "RN50.pt"), [| 0uy |])
    let clipReason = Metric.Availability("clipiqa", w).Reason
    clipReason |> should haveSubstring "RN50.state_dict.pth missing"
    clipReason |> should haveSubstring "TorchScript"
    clipReason |> should haveSubstring "bpe_simple_vocab_16e6.txt.gz missing"

[<Fact>]
let ``the random-weights mode is labelled, seeded and never the default`` () =
    use dir = new TempDir()
    use psnr = Metric.Get("psnr", noWeights dir)
    psnr.RandomWeights |> should be False
    psnr.Label |> should equal "psnr"
    use a = Metric.Get("lpips", noWeights dir, randomWeightsForTests = true)
    use b = Metric.Get("lpips", noWeights dir, randomWeightsForTests = true)
    a.RandomWeights |> should be True
    a.Label |> should haveSubstring "RANDOM WEIGHTS"
    MetricsTable.Column a |> should equal "lpips[random-weights]"
    use x = randomUInt8 1L 40 48
    use y = randomUInt8 2L 40 48
    let sa = a.Score(x, y).[0]
    Double.IsFinite sa |> should be True
    a.Score(x, y).[0] |> should equal (b.Score(x, y).[0])
    a.Score(x, x).[0] |> should (equalWithin 1e-12) 0.0
    use c = Metric.Get("lpips", noWeights dir, randomWeightsForTests = true, seed = 5L)
    c.Score(x, y).[0] |> should not' (equal sa)
    use musiq = Metric.Get("musiq", noWeights dir, randomWeightsForTests = true)
    musiq.Label |> should haveSubstring "RANDOM WEIGHTS"
    let s = musiq.Score(randomUInt8 3L 64 64)
    s.Length |> should equal 1
    Double.IsFinite s.[0] |> should be True

[<Theory>]
[<InlineData("psnr")>]
[<InlineData("ssim")>]
[<InlineData("lpips")>]
let ``a uint8 NHWC image scores as its float NCHW [0,1] copy`` (name: string) =
    use m = Metric.Get(name, "no-such-folder", randomWeightsForTests = true)
    use x8 = randomUInt8 11L 36 44
    use y8 = randomUInt8 12L 36 44
    use xf = DiffBIR.Lab.IO.ImageIO.FromUInt8 x8
    use yf = DiffBIR.Lab.IO.ImageIO.FromUInt8 y8
    let fromUInt8 = m.Score(x8, y8).[0]
    let fromFloat = m.Score(xf, yf).[0]
    let fromFloat64 = m.Score(xf.to_type(torch.ScalarType.Float64), yf.to_type(torch.ScalarType.Float64)).[0]
    fromUInt8 |> should equal fromFloat
    fromFloat64 |> should (equalWithin 1e-5) fromFloat
    // [H, W, C] and [C, H, W] without the batch axis too
    m.Score(x8.squeeze(0L), y8.squeeze(0L)).[0] |> should equal fromUInt8
    m.Score(xf.squeeze(0L), yf.squeeze(0L)).[0] |> should equal fromFloat
    // and a different image gives a different number (the comparison can fail)
    use z8 = randomUInt8 13L 36 44
    m.Score(z8, y8).[0] |> should not' (equal fromUInt8)

[<Fact>]
let ``psnr and ssim give the textbook values`` () =
    use psnr = Metric.Get "psnr"
    use ssim = Metric.Get "ssim"
    use a = torch.ones([| 1L; 3L; 32L; 32L |], dtype = torch.ScalarType.Float64) * 0.5
    use b = a + 0.1
    // MSE = 0.01 → 10·log10(1 / (0.01 + 1e-8))
    psnr.Score(b, a).[0] |> should (equalWithin 1e-9) (10.0 * Math.Log10(1.0 / (0.01 + 1e-8)))
    psnr.Score(a, a).[0] |> should (equalWithin 1e-9) 80.0
    ssim.Score(a, a).[0] |> should (equalWithin 1e-12) 1.0
    // constant images: SSIM = (2·0.5·0.6 + C1) / (0.25 + 0.36 + C1), C1 = 0.01²
    ssim.Score(b, a).[0] |> should (equalWithin 1e-12) ((2.0 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4))
    // uint8: 2 levels apart everywhere → MSE = (2/255)²
    use u = torch.tensor(Array.create (16 * 16 * 3) 100uy).reshape(1L, 16L, 16L, 3L)
    use v = torch.tensor(Array.create (16 * 16 * 3) 102uy).reshape(1L, 16L, 16L, 3L)
    psnr.Score(v, u).[0] |> should (equalWithin 1e-4) (10.0 * Math.Log10(1.0 / ((2.0 / 255.0) ** 2.0 + 1e-8)))

[<Fact>]
let ``a wrong layout or range is refused with a message that says what to do`` () =
    use psnr = Metric.Get "psnr"
    use musiq = Metric.Get("musiq", "no-such-folder", randomWeightsForTests = true)
    use f = torch.rand([| 1L; 3L; 32L; 32L |])
    use nhwcFloat = f.permute(0L, 2L, 3L, 1L).contiguous()
    throwsWith<ArgumentException> "looks NHWC" (fun () -> box (psnr.Score(nhwcFloat, nhwcFloat)))
    use nchw8 = torch.randint(0L, 256L, [| 1L; 3L; 32L; 32L |], torch.ScalarType.Byte)
    throwsWith<ArgumentException> "looks NCHW" (fun () -> box (psnr.Score(nchw8, nchw8)))
    use levels = f * 255.0
    throwsWith<ArgumentException> "0..255 levels" (fun () -> box (psnr.Score(levels, levels)))
    use signed = f * 2.0 - 1.0
    throwsWith<ArgumentException> "(x + 1) / 2" (fun () -> box (psnr.Score(signed, signed)))
    use ints = torch.zeros([| 1L; 3L; 32L; 32L |], torch.ScalarType.Int64)
    throwsWith<ArgumentException> "Int64" (fun () -> box (psnr.Score(ints, ints)))
    use smaller = torch.rand([| 1L; 3L; 32L; 30L |])
    throwsWith<ArgumentException> "32×32 (H×W) but the reference is 32×30" (fun () -> box (psnr.Score(f, smaller)))
    throwsWith<ArgumentException> "full-reference" (fun () -> box (psnr.Score f))
    throwsWith<ArgumentException> "no-reference" (fun () -> box (musiq.Score(f, f)))
    // The low-level function refuses uint8 too (it used to return ≈ 0 dB without complaint).
    throwsWith<ArgumentException> "float NCHW" (fun () -> box (ImageMetrics.Psnr(nchw8, nchw8)))

let private savePng (path: string) (seed: int) (w: int) (h: int) =
    use img = new Image<Rgb24>(w, h)
    let rnd = Random(seed)
    for y in 0 .. h - 1 do
        for x in 0 .. w - 1 do
            img.[x, y] <- Rgb24(byte (rnd.Next 256), byte ((x * 7 + y) % 256), byte (y * 5 % 256))
    img.SaveAsPng path

[<Fact>]
let ``metrics on two folders writes one CSV row per pair plus means, and names unpaired files`` () =
    use dir = new TempDir()
    let refDir = dir.File "ref"
    let predDir = dir.File "pred"
    Directory.CreateDirectory refDir |> ignore
    Directory.CreateDirectory predDir |> ignore
    savePng (Path.Combine(refDir, "a.png")) 1 24 20
    savePng (Path.Combine(predDir, "a.png")) 1 24 20   // identical → PSNR 80
    savePng (Path.Combine(refDir, "b.png")) 2 24 20
    savePng (Path.Combine(predDir, "b.png")) 3 24 20
    savePng (Path.Combine(refDir, "only-ref.png")) 4 24 20
    savePng (Path.Combine(predDir, "only-pred.png")) 5 24 20
    let csv = dir.File "table.csv"
    let code, log = run [ "metrics"; "--ref"; refDir; "--pred"; predDir; "--metrics"; "psnr,ssim"; "-o"; csv; "--weights"; noWeights dir ]
    Assert.True((code = 1), log)
    log |> should haveSubstring "only-ref.png"
    log |> should haveSubstring "only-pred.png"
    let lines = File.ReadAllLines csv
    lines.Length |> should equal 4
    lines.[0] |> should equal "name,pred,ref,psnr,ssim"
    lines.[1] |> should startWith "a,"
    lines.[2] |> should startWith "b,"
    lines.[3] |> should startWith "mean,,,"
    let cells (l: string) = l.Split ',' |> Array.map (fun s -> s.Trim())
    let psnrA = float (cells lines.[1]).[3]
    let psnrB = float (cells lines.[2]).[3]
    psnrA |> should (equalWithin 1e-9) 80.0
    psnrB |> should be (lessThan 40.0)
    float (cells lines.[3]).[3] |> should (equalWithin 1e-6) ((psnrA + psnrB) / 2.0)
    float (cells lines.[1]).[4] |> should (equalWithin 1e-12) 1.0
    Directory.GetFiles(dir.Path) |> Array.filter (fun f -> f.EndsWith ".tmp") |> should be Empty

[<Fact>]
let ``metrics exits 2 when nothing pairs or a named metric has no weights`` () =
    use dir = new TempDir()
    let refDir = dir.File "ref"
    let predDir = dir.File "pred"
    Directory.CreateDirectory refDir |> ignore
    Directory.CreateDirectory predDir |> ignore
    savePng (Path.Combine(refDir, "x.png")) 1 16 16
    savePng (Path.Combine(predDir, "y.png")) 2 16 16
    let code, log = run [ "metrics"; "--ref"; refDir; "--pred"; predDir; "--metrics"; "psnr"; "-o"; dir.File "t.csv"; "--weights"; noWeights dir ]
    Assert.True((code = 2), log)
    log |> should haveSubstring "nothing pairs"
    File.Exists(dir.File "t.csv") |> should be False
    let code2, log2 = run [ "metrics"; "--ref"; refDir; "--pred"; predDir; "--metrics"; "lpips"; "-o"; dir.File "t.csv"; "--weights"; noWeights dir ]
    Assert.True((code2 = 2), log2)
    log2 |> should haveSubstring "LPIPS_v0.1_alex-df73285e.pth missing"

/// The registry's own loading path (two files, torchvision key names mapped onto the LPIPS trunk, heads duplicated into
/// `lins`) checked against pyiqa: the LPIPS-Alex fixture has full-size weights, written here as the two released files.
[<Fact>]
let ``lpips loads the torchvision trunk and the LPIPS heads from weights/ and reproduces pyiqa's score`` () =
    use dir = new TempDir()
    let w = noWeights dir
    use f = DiffBIR.Lab.Parity.Fixture.Load(fixture "iqa/lpips_alex.safetensors")
    let trunk = Collections.Generic.Dictionary<string, torch.Tensor>()
    let heads = Collections.Generic.Dictionary<string, torch.Tensor>()
    for KeyValue(k, v) in f.Tensors do
        let parts = k.Split '.'
        // weights.net.slice2.3.weight → features.3.weight (torchvision's names)
        if k.StartsWith "weights.net.slice" then trunk.[$"features.{parts.[3]}.{parts.[4]}"] <- v
        elif Text.RegularExpressions.Regex.IsMatch(k, @"^weights\.lin\d\.") then heads.[k.Substring 8] <- v
    heads.Count |> should equal 5
    use unused = torch.zeros(4L, 4L)
    trunk.["classifier.1.weight"] <- unused // torchvision's file holds the classifier too; LPIPS does not use it
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(Path.Combine(w, "alexnet-owt-7be5be79.pth"), trunk)
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(Path.Combine(w, "LPIPS_v0.1_alex-df73285e.pth"), heads)
    use m = Metric.Get("lpips", w)
    m.RandomWeights |> should be False
    m.Label |> should equal "lpips"
    for run in [ "a"; "b" ] do
        let want = float ((f.Out $"{run}.score").item<float32>())
        let got = m.Score(f.In $"{run}.target", f.In $"{run}.ref").[0]
        got |> should (equalWithin (1e-5 * abs want)) want
    // A head file without lin2 is refused by the strict load, naming the key.
    heads.Remove "lin2.model.1.weight" |> ignore
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(Path.Combine(w, "LPIPS_v0.1_alex-df73285e.pth"), heads)
    let e = Assert.ThrowsAny<DiffBIR.Lab.Checkpoints.CheckpointException>(fun () -> Metric.Get("lpips", w) |> ignore)
    e.Message |> should haveSubstring "lin2.model.1.weight"

[<Fact>]
let ``pairing is by file-name stem; without references every prediction stands alone; a stem twice in a folder is named`` () =
    use dir = new TempDir()
    let refDir = dir.File "ref"
    let predDir = dir.File "pred"
    Directory.CreateDirectory refDir |> ignore
    Directory.CreateDirectory predDir |> ignore
    savePng (Path.Combine(refDir, "a.png")) 1 16 16
    savePng (Path.Combine(predDir, "a.png")) 1 16 16
    File.Copy(Path.Combine(predDir, "a.png"), Path.Combine(predDir, "b.png"))
    File.Copy(Path.Combine(predDir, "a.png"), Path.Combine(predDir, "b.bmp"))   // same stem twice: ambiguous
    File.WriteAllText(Path.Combine(predDir, "notes.txt"), "not an image")
    let r = MetricsTable.Pair(predDir, refDir)
    r.Pairs |> Seq.map (fun p -> p.Name) |> List.ofSeq |> should equal [ "a" ]
    r.Unpaired |> Seq.exists (fun u -> u.Contains "b.bmp" && u.Contains "b.png" && u.Contains "same name stem") |> should be True
    r.Unpaired.Count |> should equal 1
    let alone = MetricsTable.Pair(predDir, null)
    alone.Pairs.Count |> should equal 1
    alone.Pairs.[0].Name |> should equal "a"
    isNull alone.Pairs.[0].Ref |> should be True

[<Fact>]
let ``weights list shows each metric's availability and fetch refuses an unknown metric`` () =
    use dir = new TempDir()
    let w = noWeights dir
    let manifest = Path.Combine(repoRoot, "weights", "manifest.json")
    let code, log = run [ "weights"; "list"; "--weights"; w; "--manifest"; manifest ]
    Assert.True((code = 0), log)
    log |> should haveSubstring "metric psnr       available"
    log |> should haveSubstring "musiq_koniq_ckpt-e95806b9.pth missing"
    let code2, log2 = run [ "weights"; "fetch"; "metrics"; "--metrics"; "niqe"; "--weights"; w; "--manifest"; manifest ]
    Assert.True((code2 = 2), log2)
    log2 |> should haveSubstring "unknown metric 'niqe'"

[<Fact>]
let ``weights fetch metrics downloads exactly the named metric's files, which then load or are refused by name`` () =
    use dir = new TempDir()
    let w = noWeights dir
    let payload = Array.init 4096 (fun i -> byte (i % 251))
    let port =
        let l = new Net.Sockets.TcpListener(Net.IPAddress.Loopback, 0)
        l.Start()
        let p = (l.LocalEndpoint :?> Net.IPEndPoint).Port
        l.Stop()
        p
    use listener = new Net.HttpListener()
    listener.Prefixes.Add(sprintf "http://127.0.0.1:%d/" port)
    listener.Start()
    let served = Collections.Concurrent.ConcurrentBag<string>()
    let _server =
        Threading.Tasks.Task.Run(fun () ->
            try
                while listener.IsListening do
                    let ctx = listener.GetContext()
                    served.Add ctx.Request.Url.AbsolutePath
                    ctx.Response.ContentLength64 <- int64 payload.Length
                    ctx.Response.OutputStream.Write(payload, 0, payload.Length)
                    ctx.Response.Close()
            with _ -> ())
    let entry id file =
        sprintf """{ "id": "%s", "file": "%s", "url": "http://127.0.0.1:%d/%s", "size_bytes": null, "sha256": null, "format": "test", "loads_into": "test", "loading": "test" }""" id file port file
    let manifest = dir.File "manifest.json"
    File.WriteAllText(manifest,
        sprintf """{ "schema_version": 1, "files": [ %s, %s ], "presets": {}, "always": [] }"""
            (entry "musiq_koniq" "musiq_koniq_ckpt-e95806b9.pth") (entry "maniqa_koniq" "ckpt_koniq10k.pt"))
    let code, log = run [ "weights"; "fetch"; "metrics"; "--metrics"; "musiq"; "--weights"; w; "--manifest"; manifest ]
    Assert.True((code = 0), log)
    served |> List.ofSeq |> should equal [ "/musiq_koniq_ckpt-e95806b9.pth" ]
    File.Exists(Path.Combine(w, "ckpt_koniq10k.pt")) |> should be False
    Metric.Availability("musiq", w).Available |> should be True
    // These bytes are not a checkpoint: the metric refuses to load them, naming the file — it never scores.
    let e = Assert.ThrowsAny<DiffBIR.Lab.Checkpoints.CheckpointException>(fun () -> Metric.Get("musiq", w) |> ignore)
    e.Message |> should haveSubstring "musiq_koniq_ckpt-e95806b9.pth"
    listener.Stop()
