/// The catalogue of bad inputs, hostile files and faults, tried as a user would with the built CLI: per case the exit
/// code, one line on stderr naming the option or file and the cause, no stack trace, no partial or changed file, and
/// (for folders) the other inputs still done. README "Errors and exit codes" documents the codes.
module DiffBIR.Lab.Tests.BadInputTests

open System
open System.IO
open System.IO.Compression
open System.Diagnostics
open System.Security.Cryptography
open Xunit
open FsUnit.Xunit
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open TorchSharp
open DiffBIR.Lab.Tests.TestSupport

/// Runs `diffbir-lab ARGS` in `cwd`; returns exit code, stdout, stderr.
let run3 (cwd: string) (args: string list) =
    let dll = Path.Combine(AppContext.BaseDirectory, "diffbir-lab.dll")
    let psi = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = cwd)
    psi.ArgumentList.Add dll
    for a in args do psi.ArgumentList.Add a
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit 300_000) then p.Kill true
    p.ExitCode, out.Result, err.Result

let private image (path: string) (w: int) (h: int) =
    use img = new Image<Rgb24>(w, h)
    for y in 0 .. h - 1 do
        for x in 0 .. w - 1 do img.[x, y] <- Rgb24(byte (x * 13), byte (y * 7), byte ((x + y) * 5))
    img.Save path

/// SHA-256 of every file under a folder, by relative path (to prove nothing changed).
let private snapshot (dir: string) =
    if not (Directory.Exists dir) then Map.empty
    else
        Directory.GetFiles(dir, "*", SearchOption.AllDirectories)
        |> Array.filter (fun f -> (FileInfo f).Length > 0L || not (f.EndsWith "fifo.png"))
        |> Array.map (fun f ->
            let info = FileInfo f
            Path.GetRelativePath(dir, f), (if info.Length = 0L then "" else Convert.ToHexString(SHA256.HashData(File.ReadAllBytes f))))
        |> Map.ofArray

/// A torch zip checkpoint whose pickle rebuilds a tensor of size [-3] (libtorch would abort on it).
let private negativeSizePickle =
    "gAJ9WAEAAAB3Y3RvcmNoLl91dGlscwpfcmVidWlsZF90ZW5zb3JfdjIKKChYBwAAAHN0b3JhZ2VjdG9yY2gKRmxvYXRTdG9yYWdlClgBAAAAMFgDAAAAY3B1SgQAAAB0UUoAAAAASv3///+FSgEAAACFiWNjb2xsZWN0aW9ucwpPcmRlcmVkRGljdAopUnRScy4="

let private torchZip (path: string) (pickle: byte[]) =
    use fs = File.Create path
    use z = new ZipArchive(fs, ZipArchiveMode.Create)
    let put (name: string) (bytes: byte[]) =
        use s = z.CreateEntry(name, CompressionLevel.NoCompression).Open()
        s.Write(bytes, 0, bytes.Length)
    put "archive/data.pkl" pickle
    put "archive/data/0" (Array.zeroCreate 16)
    put "archive/version" "3\n"B

let private safetensors (path: string) (header: string) (dataBytes: int) =
    let h = Text.Encoding.UTF8.GetBytes header
    use fs = File.Create path
    fs.Write(BitConverter.GetBytes(uint64 h.Length), 0, 8)
    fs.Write(h, 0, h.Length)
    fs.Write(Array.zeroCreate dataBytes, 0, dataBytes)

/// What a case expects. `Fragments`: each must appear in stderr. `OneLine`: stderr is exactly one line.
/// `Untouched`: folders (relative to the case dir) whose files must be byte-identical after the run.
/// `Outputs`/`NoOutputs`: files (relative) that must / must not exist afterwards.
type Case =
    { Name: string
      Setup: string -> unit
      Args: string list
      Code: int
      Fragments: string list
      OneLine: bool
      Untouched: string list
      Outputs: string list
      NoOutputs: string list }

let private tiny = [ "--version"; "tiny-random"; "--steps"; "1"; "--sampler"; "ddim"; "--weights"; "no-weights" ]
let private oneImage dir = Directory.CreateDirectory(Path.Combine(dir, "in")) |> ignore; image (Path.Combine(dir, "in", "a.png")) 16 16
let private restoreIn extra = [ "restore"; "-i"; "in"; "-o"; "out" ] @ tiny @ extra

/// An option refused before anything runs: exit 2, one line naming the option, nothing written.
let private refused name extra fragments =
    { Name = name; Setup = oneImage; Args = restoreIn extra; Code = 2; Fragments = fragments; OneLine = true
      Untouched = [ "in" ]; Outputs = []; NoOutputs = [ "out" ] }

let cases : Case list =
    [ refused "steps 0" [ "--steps"; "0" ] [ "--steps" ]
      refused "steps -1" [ "--steps"; "-1" ] [ "--steps" ]
      refused "steps NaN" [ "--steps"; "NaN" ] [ "--steps"; "'NaN' is not a valid value" ]
      refused "steps int max" [ "--steps"; "2147483647" ] [ "--steps"; "1..1000" ]
      refused "seed abc" [ "--seed"; "abc" ] [ "--seed"; "not an integer" ]
      refused "seed negative" [ "--seed"; "-1" ] [ "--seed"; "official range" ]
      refused "seed past 2^32" [ "--seed"; "4294967296" ] [ "--seed"; "4294967295" ]
      refused "seeds of n-samples past 2^32" [ "--seed"; "4294967295"; "--n-samples"; "2" ] [ "--seed"; "--n-samples" ]
      refused "upscale 0" [ "--upscale"; "0" ] [ "--upscale" ]
      refused "upscale -2" [ "--upscale"; "-2" ] [ "--upscale" ]
      refused "upscale NaN" [ "--upscale"; "NaN" ] [ "--upscale"; "finite" ]
      refused "upscale Infinity" [ "--upscale"; "Infinity" ] [ "--upscale"; "finite" ]
      refused "cfg NaN" [ "--cfg"; "NaN" ] [ "--cfg"; "finite" ]
      refused "cfg -Infinity" [ "--cfg=-Infinity" ] [ "--cfg"; "finite" ]
      refused "g-scale NaN" [ "--guidance"; "mse"; "--g-scale"; "NaN" ] [ "--g-scale"; "finite" ]
      refused "g-patch 0" [ "--guidance"; "wmse"; "--g-scale"; "1"; "--g-patch"; "0" ] [ "--g-patch" ]
      refused "g-norm unknown" [ "--guidance"; "wmse"; "--g-norm"; "median" ] [ "--g-norm"; "median"; "percentile:Q" ]
      refused "g-norm temperature 0" [ "--guidance"; "wmse"; "--g-norm"; "sum:0" ] [ "--g-norm"; "temperature" ]
      refused "g-norm percentile past 100" [ "--guidance"; "wmse"; "--g-norm"; "percentile:150" ] [ "--g-norm"; "(0, 100]" ]
      refused "empty guidance window" [ "--guidance"; "mse"; "--g-scale"; "1"; "--g-start"; "100"; "--g-stop"; "900" ] [ "--g-start"; "empty window" ]
      refused "g-repeat 0" [ "--guidance"; "mse"; "--g-repeat"; "0" ] [ "--g-repeat" ]
      refused "bad guidance kind" [ "--guidance"; "l1" ] [ "--guidance" ]
      refused "bad guidance schedule" [ "--guidance"; "mse"; "--g-schedule"; "zigzag:1" ] [ "--g-schedule" ]
      refused "bad g-space" [ "--guidance"; "mse"; "--g-space"; "pixel" ] [ "--g-space" ]
      refused "cleaner tile size 0" [ "--cleaner-tiled"; "--cleaner-tile-size"; "0" ] [ "--cleaner-tile-size" ]
      refused "cldm tile stride in pixels" [ "--cldm-tiled"; "--cldm-tile-stride"; "4" ] [ "--cldm-tile-stride"; "4 px" ]
      refused "cldm tile stride over the tile" [ "--cldm-tiled"; "--cldm-tile-stride"; "1024" ] [ "--cldm-tile-stride"; "512 px" ]
      refused "cldm tile size not a multiple of 64" [ "--cldm-tiled"; "--cldm-tile-size"; "100" ] [ "--cldm-tile-size"; "64" ]
      refused "n-samples 0" [ "--n-samples"; "0" ] [ "--n-samples" ]
      refused "batch-size 0" [ "--batch-size"; "0" ] [ "--batch-size" ]
      refused "threads 0" [ "--threads"; "0" ] [ "--threads" ]
      refused "unknown sampler" [ "--sampler"; "euler_x" ] [ "--sampler"; "euler_x" ]
      refused "unknown precision" [ "--precision"; "fp8" ] [ "--precision" ]
      refused "unknown device" [ "--device"; "tpu" ] [ "--device" ]
      refused "unknown task" [ "--task"; "deblur" ] [ "--task" ]
      refused "noise-aug past 999" [ "--noise-aug"; "1000" ] [ "--noise-aug" ]
      refused "unknown option" [ "--stpes"; "2" ] [ "stpes" ]
      { refused "-o names a file" [] [ "-o"; "is a file" ] with
          Setup = (fun d -> oneImage d; File.WriteAllText(Path.Combine(d, "out"), "keep me"))
          Untouched = [ "in"; "out" ]; NoOutputs = [] }
      { refused "-o is the input folder" [] [ "-o"; "inputs are read from" ] with Args = [ "restore"; "-i"; "in"; "-o"; "in" ] @ tiny }
      { refused "-o is the folder of the input file" [] [ "-o"; "inputs are read from" ] with Args = [ "restore"; "-i"; "in/a.png"; "-o"; "in/" ] @ tiny }
      { refused "input does not exist" [] [ "nope"; "no such file" ] with Args = [ "restore"; "-i"; "nope"; "-o"; "out" ] @ tiny; Untouched = [] }
      { refused "input folder without images" [] [ "empty"; "no images" ] with
          Setup = (fun d -> Directory.CreateDirectory(Path.Combine(d, "empty")) |> ignore); Args = [ "restore"; "-i"; "empty"; "-o"; "out" ] @ tiny; Untouched = [] }
      { refused "a 1×5000 image would make a huge condition image" [] [ "thin.png"; "5000×1"; "condition image"; "--cldm-tiled" ] with
          Setup = (fun d -> image (Path.Combine(d, "thin.png")) 5000 1); Args = [ "restore"; "-i"; "thin.png"; "-o"; "out"; "--upscale"; "1" ] @ tiny; Untouched = [] }
      { refused "upscale 1000 would make a huge output" [] [ "small.png"; "32000×32000"; "output" ] with
          Setup = (fun d -> image (Path.Combine(d, "small.png")) 32 32); Args = [ "restore"; "-i"; "small.png"; "-o"; "out"; "--upscale"; "1000" ] @ tiny; Untouched = [] }
      { refused "upscale 0.001 would make an empty output" [] [ "small.png"; "empty" ] with
          Setup = (fun d -> image (Path.Combine(d, "small.png")) 32 32); Args = [ "restore"; "-i"; "small.png"; "-o"; "out"; "--upscale"; "0.001" ] @ tiny; Untouched = [] }
      { refused "/dev/zero as an image" [] [ "/dev/zero"; "not a regular file" ] with Args = [ "restore"; "-i"; "/dev/zero"; "-o"; "out" ] @ tiny; Untouched = [] }
      { refused "a FIFO as an image" [] [ "fifo.png"; "not a regular file" ] with
          Setup = (fun d -> Process.Start("mkfifo", Path.Combine(d, "fifo.png")).WaitForExit())
          Args = [ "restore"; "-i"; "fifo.png"; "-o"; "out" ] @ tiny; Untouched = [] }
      { refused "a truncated PNG alone" [] [ "cut.png"; "truncated" ] with
          Setup = (fun d -> image (Path.Combine(d, "full.png")) 64 64; File.WriteAllBytes(Path.Combine(d, "cut.png"), File.ReadAllBytes(Path.Combine(d, "full.png")).[.. 60]))
          Args = [ "restore"; "-i"; "cut.png"; "-o"; "out" ] @ tiny; Untouched = [] }
      { refused "custom SD checkpoint without SD keys" [] [ "notsd.safetensors"; "not a Stable Diffusion checkpoint" ] with
          Setup = (fun d ->
              oneImage d
              for f in [ "notsd.safetensors"; "cleaner.safetensors"; "cn.safetensors" ] do
                  safetensors (Path.Combine(d, f)) """{"foo.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""" 8)
          Args = [ "restore"; "-i"; "in"; "-o"; "out"; "--version"; "custom"; "--sd-ckpt"; "notsd.safetensors"; "--cleaner-ckpt"; "cleaner.safetensors"; "--controlnet-ckpt"; "cn.safetensors" ] }
      { refused "custom preset without its checkpoints" [] [ "--sd-ckpt" ] with Args = [ "restore"; "-i"; "in"; "-o"; "out"; "--version"; "custom"; "--steps"; "1" ] }
      { refused "CFG so large the latents overflow" [ "--cfg"; "1e300" ] [ "in/a.png"; "non-finite"; "--cfg" ] with NoOutputs = [ "out/a.png"; "out/a.json" ] }
      // Checkpoint tools on hostile and broken files: exit 2, one line naming the file, nothing executed or allocated.
      { refused "pickle nested 200,000 deep" [] [ "deep.pth"; "nests" ] with
          Setup = (fun d ->
              let n = 200_000
              let pk = Array.concat [ [| 0x80uy; 2uy |]; Array.create n (byte '('); [| byte ']' |]; Array.create n (byte 'l'); [| byte '.' |] ]
              torchZip (Path.Combine(d, "deep.pth")) pk)
          Args = [ "weights"; "inspect"; "deep.pth" ]; Untouched = [] }
      { refused "tensor of negative size" [] [ "negative.pth"; "size [-3]" ] with
          Setup = (fun d -> torchZip (Path.Combine(d, "negative.pth")) (Convert.FromBase64String negativeSizePickle))
          Args = [ "weights"; "inspect"; "negative.pth" ]; Untouched = [] }
      { refused "random bytes named .safetensors" [] [ "random.safetensors"; "safetensors" ] with
          Setup = (fun d -> File.WriteAllBytes(Path.Combine(d, "random.safetensors"), Array.init 4096 (fun i -> byte ((i * 7919 + 13) % 251))))
          Args = [ "weights"; "inspect"; "random.safetensors" ]; Untouched = [] }
      { refused "random bytes named .pth" [] [ "random.pth"; "not a checkpoint" ] with
          Setup = (fun d -> File.WriteAllBytes(Path.Combine(d, "random.pth"), Array.init 4096 (fun i -> byte ((i * 7919 + 13) % 251))))
          Args = [ "weights"; "inspect"; "random.pth" ]; Untouched = [] }
      { refused "safetensors with overlapping tensors" [] [ "overlap.safetensors"; "overlap" ] with
          Setup = (fun d ->
              safetensors (Path.Combine(d, "overlap.safetensors"))
                  """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""" 12)
          Args = [ "weights"; "inspect"; "overlap.safetensors" ]; Untouched = [] }
      { refused "safetensors with a negative shape" [] [ "neg.safetensors"; "shape" ] with
          Setup = (fun d -> safetensors (Path.Combine(d, "neg.safetensors")) """{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""" 8)
          Args = [ "weights"; "inspect"; "neg.safetensors" ]; Untouched = [] }
      // parity with nothing to check is a check that did not pass: exit 1 (not 0), one line
      { refused "parity on an empty folder" [] [ "nothing to check"; "empty" ] with
          Setup = (fun d -> Directory.CreateDirectory(Path.Combine(d, "empty")) |> ignore); Args = [ "parity"; "empty" ]; Code = 1; Untouched = [] }
      { refused "parity on a mistyped path" [] [ "fixturs"; "no such file" ] with Args = [ "parity"; "fixturs" ]; Untouched = [] }
      { refused "notebooks run on an empty folder" [] [ "empty"; "nothing to run" ] with
          Setup = (fun d -> Directory.CreateDirectory(Path.Combine(d, "empty")) |> ignore); Args = [ "notebooks"; "run"; "empty" ]; Untouched = [] }
      { refused "notebooks run on a mistyped path" [] [ "nb.ipynb"; "no such notebook" ] with Args = [ "notebooks"; "run"; "nb.ipynb" ]; Untouched = [] }
      // Cases where something runs.
      { Name = "parity on unrelated tensors (no case in __metadata__) has nothing to check, not a crash"
        Setup = (fun d -> safetensors (Path.Combine(d, "unrelated.safetensors")) """{"foo":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""" 8)
        Args = [ "parity"; "unrelated.safetensors" ]; Code = 1; Fragments = [ "nothing to check"; "unrelated.safetensors" ]; OneLine = true
        Untouched = []; Outputs = []; NoOutputs = [] }
      { Name = "a.png and a.jpg get distinct outputs"
        Setup = (fun d -> oneImage d; image (Path.Combine(d, "in", "a.jpg")) 16 16)
        Args = restoreIn []; Code = 0; Fragments = []; OneLine = false; Untouched = [ "in" ]
        Outputs = [ "out/a_png.png"; "out/a_jpg.png"; "out/a_png.json"; "out/a_jpg.json" ]; NoOutputs = [ "out/a.png" ] }
      { Name = "a corrupt image in a folder: reported, the others done, exit 1"
        Setup = (fun d -> oneImage d; File.WriteAllBytes(Path.Combine(d, "in", "broken.png"), Array.init 300 byte))
        Args = restoreIn []; Code = 1; Fragments = [ "broken.png" ]; OneLine = true; Untouched = [ "in" ]
        Outputs = [ "out/a.png"; "out/a.json" ]; NoOutputs = [ "out/broken.png"; "out/broken.json" ] }
      { Name = "an oversized image in a folder: refused by name, the others done, exit 1"
        Setup = (fun d -> oneImage d; image (Path.Combine(d, "in", "thin.png")) 5000 1)
        Args = restoreIn [ "--upscale"; "1" ]; Code = 1; Fragments = [ "thin.png"; "condition image" ]; OneLine = true; Untouched = [ "in" ]
        Outputs = [ "out/a.png" ]; NoOutputs = [ "out/thin.png" ] } ]

let caseNames : TheoryData<string> =
    let d = TheoryData<string>()
    for c in cases do d.Add c.Name
    d

[<Theory>]
[<MemberData(nameof caseNames)>]
let ``bad input gets one clear line and a documented exit code`` (name: string) =
    let c = cases |> List.find (fun c -> c.Name = name)
    use dir = new TempDir()
    c.Setup dir.Path
    let before = c.Untouched |> List.map (fun u -> u, snapshot (Path.Combine(dir.Path, u)))
    let sw = Stopwatch.StartNew()
    let code, out, err = run3 dir.Path c.Args
    let log = sprintf "exit %d after %.1fs\nstdout:\n%s\nstderr:\n%s" code sw.Elapsed.TotalSeconds out err
    Assert.True((code = c.Code), log)
    for f in c.Fragments do Assert.True(err.Contains(f, StringComparison.Ordinal), sprintf "stderr lacks '%s'\n%s" f log)
    Assert.False((out + err).Contains("   at ", StringComparison.Ordinal), "stack trace printed\n" + log)
    Assert.False((out + err).Contains("Exception", StringComparison.Ordinal), "exception type shown\n" + log)
    if c.OneLine then
        let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries)
        Assert.True((lines.Length = 1), sprintf "expected one line on stderr\n%s" log)
        Assert.StartsWith("error: ", lines.[0])
    for u, snap in before do Assert.True((snapshot (Path.Combine(dir.Path, u)) = snap), sprintf "%s changed\n%s" u log)
    for o in c.Outputs do Assert.True(File.Exists(Path.Combine(dir.Path, o)), sprintf "%s missing\n%s" o log)
    for o in c.NoOutputs do
        let p = Path.Combine(dir.Path, o)
        Assert.False(File.Exists p || (Directory.Exists p && Directory.EnumerateFileSystemEntries(p) |> Seq.isEmpty |> not), sprintf "%s was written\n%s" o log)
    // nothing half-written anywhere
    Directory.GetFiles(dir.Path, "*.tmp*", SearchOption.AllDirectories) |> should be Empty

[<Fact>]
let ``the catalogue has at least 40 cases`` () = cases.Length |> should be (greaterThanOrEqualTo 40)

[<Fact>]
let ``this process runs the pinned libtorch, and says so`` () =
    DiffBIR.Lab.RunInfo.UsePinnedLibTorch() |> ignore
    use _t = torch.ones(2L)
    DiffBIR.Lab.RunInfo.LibTorchVersion |> should equal DiffBIR.Lab.RunInfo.PinnedLibTorch
    DiffBIR.Lab.RunInfo.LibTorchWarning() |> should equal null
    let m = DiffBIR.Lab.RunInfo.Manifest("cpu", 7L)
    m.["threads"].GetValue<int>() |> should be (greaterThan 0)
    m.["seed"].GetValue<int64>() |> should equal 7L

[<Fact>]
let ``an output cut short is redone on the rerun, an intact one is skipped`` () =
    use dir = new TempDir()
    oneImage dir.Path
    let args = restoreIn []
    let code, _, err = run3 dir.Path args
    Assert.True((code = 0), err)
    let png = Path.Combine(dir.Path, "out", "a.png")
    let good = File.ReadAllBytes png
    // the manifest records what the run used: the output's hash, libtorch (version and file), threads
    let m = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "out", "a.json")))
    m.["output_sha256"].GetValue<string>() |> should equal (Convert.ToHexStringLower(SHA256.HashData good))
    m.["versions"].["libtorch"].GetValue<string>() |> should equal DiffBIR.Lab.RunInfo.PinnedLibTorch
    m.["threads"].GetValue<int>() |> should equal Environment.ProcessorCount
    let code2, out2, _ = run3 dir.Path args
    code2 |> should equal 0
    out2 |> should haveSubstring "1 up to date"
    File.WriteAllBytes(png, good.[.. 99])
    let code3, out3, _ = run3 dir.Path args
    code3 |> should equal 0
    out3 |> should haveSubstring "1 restored"
    File.ReadAllBytes png |> should equal good

[<Fact>]
let ``restore --batch-size batches images and samples of one size, and equals one at a time within one level`` () =
    use dir = new TempDir()
    oneImage dir.Path
    image (Path.Combine(dir.Path, "in", "b.png")) 16 16
    let runWith (bs: int) out =
        let code, stdout, err = run3 dir.Path ([ "restore"; "-i"; "in"; "-o"; out; "--n-samples"; "2"; "--batch-size"; string bs ] @ tiny)
        Assert.True((code = 0), stdout + err)
        stdout
    runWith 1 "one" |> ignore
    runWith 4 "four" |> ignore
    for stem in [ "a_0"; "a_1"; "b_0"; "b_1" ] do
        use one = DiffBIR.Lab.IO.ImageIO.Load(Path.Combine(dir.Path, "one", stem + ".png"))
        use four = DiffBIR.Lab.IO.ImageIO.Load(Path.Combine(dir.Path, "four", stem + ".png"))
        let d = (one.Image - four.Image).abs().max().item<float32>()
        Assert.True(d <= 1.0f / 255.0f + 1e-6f, sprintf "%s differs by %f" stem (d * 255.0f))
        let m = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "four", stem + ".json")))
        m.["batch"].GetValue<int>() |> should equal 4          // one batch of the four outputs
    // samples keep their seeds in a batch
    let m1 = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "four", "a_1.json")))
    m1.["seed"].GetValue<int64>() |> should equal 232L

[<Fact>]
let ``without --steps the preset's default runs, and the manifest records it`` () =
    use dir = new TempDir()
    oneImage dir.Path
    let code, out, err = run3 dir.Path [ "restore"; "-i"; "in"; "-o"; "out"; "--version"; "tiny-random"; "--sampler"; "ddim"; "--weights"; "no-weights" ]
    Assert.True((code = 0), out + err)
    let m = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "out", "a.json")))
    m.["settings"].["steps"].GetValue<int>() |> should equal DiffBIR.Lab.Pipeline.Presets.TinyRandom.Defaults.Steps
