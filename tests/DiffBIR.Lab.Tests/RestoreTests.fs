/// `diffbir-lab restore` as a user runs it: a folder of mixed images with the tiny preset, manifests, skip on re-run,
/// a corrupt file, missing weights.
module DiffBIR.Lab.Tests.RestoreTests

open System.IO
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open DiffBIR.Lab.Tests.TestSupport
open DiffBIR.Lab.Tests.CliTests

/// A folder with PNG, JPEG, greyscale, 16-bit and alpha images (16×16: the tiny preset restores them in seconds).
let private mixedFolder (dir: TempDir) =
    let input = dir.File "in"
    Directory.CreateDirectory input |> ignore
    let pattern (img: Image<Rgba32>) =
        for y in 0 .. img.Height - 1 do
            for x in 0 .. img.Width - 1 do
                img.[x, y] <- Rgba32(byte (x * 15), byte (y * 15), byte ((x + y) * 7), (if x < 4 then 128uy else 255uy))
    use rgba = new Image<Rgba32>(16, 16)
    pattern rgba
    rgba.SaveAsPng(Path.Combine(input, "alpha.png"))
    use rgb = rgba.CloneAs<Rgb24>()
    rgb.SaveAsJpeg(Path.Combine(input, "photo.jpg"))
    use grey = rgba.CloneAs<L8>()
    grey.SaveAsPng(Path.Combine(input, "grey.png"))
    use deep = rgba.CloneAs<Rgb48>()
    deep.SaveAsPng(Path.Combine(input, "deep16.png"), Formats.Png.PngEncoder(BitDepth = Formats.Png.PngBitDepth.Bit16, ColorType = Formats.Png.PngColorType.Rgb))
    input

[<Fact>]
let ``a folder of mixed images is restored with manifests, and a re-run skips what is up to date`` () =
    use dir = new TempDir()
    let input = mixedFolder dir
    let out = dir.File "out"
    let args = [ "restore"; "--input"; input; "--output"; out; "--preset"; "tiny-random"; "--steps"; "2"; "--sampler"; "spaced"; "--weights"; dir.File "no-weights" ]
    let code, log = run args
    Assert.True((code = 0), log)
    for stem in [ "alpha"; "photo"; "grey"; "deep16" ] do
        File.Exists(Path.Combine(out, stem + ".png")) |> should be True
        let m = JsonNode.Parse(File.ReadAllText(Path.Combine(out, stem + ".json")))
        m.["not_a_trained_model"].GetValue<bool>() |> should be True
        m.["seed"].GetValue<int64>() |> should equal 231L
        m.["settings"].["sampler"].GetValue<string>() |> should equal "spaced"
        m.["input_sha256"].GetValue<string>().Length |> should equal 64
    // ×4 of 16×16
    use back = DiffBIR.Lab.IO.ImageIO.Load(Path.Combine(out, "grey.png"))
    (back.Info.Width, back.Info.Height) |> should equal (64, 64)
    log |> should haveSubstring "NOT a trained model"
    let code2, log2 = run args
    code2 |> should equal 0
    log2 |> should haveSubstring "4 up to date"
    Directory.GetFiles(out) |> Array.filter (fun f -> f.EndsWith ".tmp") |> should be Empty

[<Fact>]
let ``a corrupt image is reported and the others are still restored; the exit code says something failed`` () =
    use dir = new TempDir()
    let input = dir.File "in"
    Directory.CreateDirectory input |> ignore
    use ok = new Image<Rgb24>(16, 16)
    ok.SaveAsPng(Path.Combine(input, "good.png"))
    File.WriteAllBytes(Path.Combine(input, "broken.png"), Array.init 300 (fun i -> byte i))
    let out = dir.File "out"
    let code, log = run [ "restore"; "--input"; input; "--output"; out; "--preset"; "tiny-random"; "--steps"; "1"; "--sampler"; "ddim" ]
    code |> should equal 1
    log |> should haveSubstring "broken.png"
    File.Exists(Path.Combine(out, "good.png")) |> should be True
    File.Exists(Path.Combine(out, "broken.png")) |> should be False

[<Fact>]
let ``missing weights name each file and the fetch command`` () =
    use dir = new TempDir()
    use ok = new Image<Rgb24>(16, 16)
    ok.SaveAsPng(dir.File "a.png")
    let code, log = run [ "restore"; "--input"; dir.File "a.png"; "--output"; dir.File "out"; "--preset"; "v2"; "--weights"; dir.File "empty" ]
    code |> should equal 2
    log |> should haveSubstring "BSRNet.pth"
    log |> should haveSubstring "v2.pth"
    log |> should haveSubstring "diffbir-lab weights fetch v2"

[<Fact>]
let ``guidance options reach the pipeline: wmse with a patch size and a schedule`` () =
    use dir = new TempDir()
    use ok = new Image<Rgb24>(16, 16)
    ok.SaveAsPng(dir.File "a.png")
    let code, log = run [ "restore"; "--input"; dir.File "a.png"; "--output"; dir.File "out"; "--preset"; "tiny-random"; "--steps"; "2"; "--sampler"; "spaced"
                          "--guidance"; "wmse"; "--g-scale"; "0.5"; "--g-patch"; "4"; "--g-schedule"; "linear:0:1" ]
    Assert.True((code = 0), log)
    let m = JsonNode.Parse(File.ReadAllText(dir.File "out/a.json"))
    m.["settings"].["guidance"].GetValue<string>() |> should equal "wmse"
    m.["settings"].["g_patch"].GetValue<int>() |> should equal 4
    m.["settings"].["g_scale"].GetValue<float>() |> should equal 0.5
    m.["settings"].["g_schedule"].GetValue<string>() |> should equal "linear 0→1"
    // what the guide used (reported by the pipeline per step, not recomputed by the CLI): at every guided step the
    // scale in effect is 0.5·f(t), f linear 0 at t=999 → 1 at t=0
    let steps = m.["guidance_steps"].AsArray()
    steps.Count |> should equal 2
    for st in steps do
        let t = st.["t"].GetValue<int>()
        st.["scale"].GetValue<float>() |> should (equalWithin 1e-12) (0.5 * (1.0 - float t / 999.0))
        st.["loss"].GetValue<float>() |> should be (greaterThan 0.0)

[<Fact>]
let ``the preset's defaults hold where no option is given, and the manifest writes the effective options`` () =
    use dir = new TempDir()
    use ok = new Image<Rgb24>(16, 16)
    ok.SaveAsPng(dir.File "a.png")
    // tiny-random's defaults: 2 steps (official 10), otherwise inference.py's; only --cfg is given
    let code, log = run [ "restore"; "--input"; dir.File "a.png"; "--output"; dir.File "out"; "--preset"; "tiny-random"; "--cfg"; "3" ]
    Assert.True((code = 0), log)
    let settings = JsonNode.Parse(File.ReadAllText(dir.File "out/a.json")).["settings"]
    settings.["steps"].GetValue<int>() |> should equal 2
    settings.["cfg"].GetValue<float>() |> should equal 3.0
    settings.["sampler"].GetValue<string>() |> should equal "edm_dpm++_3m_sde"
    settings.["start_point"].GetValue<string>() |> should equal "noise"
    settings.["neg_prompt"].GetValue<string>() |> should equal DiffBIR.Lab.Pipeline.PipelineOptions.DefaultNegPrompt
    settings.["guidance"].GetValue<string>() |> should equal "none"

[<Fact>]
let ``consecutive tiny restorations in one process leave no native tensors behind`` () =
    let samples = DiffBIR.Lab.Cli.Commands.BenchMemoryCommand.Measure(6, 16, 2)
    for s in samples do printfn "run %d: RSS %.1f MiB, live tensors %d" s.Run (float s.RssBytes / 1048576.0) s.LiveTensors
    let counts = samples |> List.ofSeq |> List.map (fun s -> s.LiveTensors)
    // the count after every run is the same: nothing accumulates across runs
    counts |> List.distinct |> List.length |> should equal 1
