/// Conditioning as a value (Condition once, Sample many) and the sweep engine: results table, resume, shards, CLI.
module DiffBIR.Lab.Tests.SweepTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Pipeline
open DiffBIR.Lab.Guidance
open DiffBIR.Lab.Tests.TestSupport

/// A 32×32 test image with structure (gradients and a square), uint8 [1, 32, 32, 3].
let testImage () =
    let y = torch.arange(32L).to_type(torch.ScalarType.Float32).view(32L, 1L).expand(32L, 32L)
    let x = torch.arange(32L).to_type(torch.ScalarType.Float32).view(1L, 32L).expand(32L, 32L)
    let square = ((y.gt(torch.tensor 8.0f)).logical_and(y.lt(torch.tensor 20.0f)).logical_and(x.gt(torch.tensor 10.0f)).logical_and(x.lt(torch.tensor 24.0f))).to_type(torch.ScalarType.Float32)
    torch.stack([| y * 8.0f; x * 8.0f; square * 255.0f |], 2).to_type(torch.ScalarType.Byte).unsqueeze(0L)

/// Stage 1 that counts its calls (wraps the tiny preset's cleaner).
type CountingCleaner(inner: Cleaner) =
    inherit Cleaner(inner.Network)
    member val Calls = 0 with get, set
    override _.Kind = inner.Kind
    override _.OutputSize(h, w) = inner.OutputSize(h, w)
    override this.Apply(lq, tiled, tileSize, tileStride) =
        this.Calls <- this.Calls + 1
        inner.Apply(lq, tiled, tileSize, tileStride)

let private guidanceSettings =
    [ WeightedMseGuidance(Scale = 0.1, PatchSize = 2) :> RestorationGuidance
      WeightedMseGuidance(Scale = 0.5, PatchSize = 4)
      MseGuidance(Scale = 1.0) ]

let private sameTensor (a: torch.Tensor) (b: torch.Tensor) = a.shape = b.shape && a.equal(b).all().item<bool>()

[<Fact>]
let ``a sweep of guidance settings on one input runs stage 1, the VAE encoder and CLIP exactly once`` () =
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    let inner = preset.Pipeline.Cleaner
    let counting = new CountingCleaner(inner, ConditionShortEdge = inner.ConditionShortEdge)
    let pipe = new RestorationPipeline(counting, preset.Pipeline.Cldm, preset.Pipeline.Schedule)
    use lq = testImage ()
    let options = [ for g in guidanceSettings -> PipelineOptions(Steps = 2, Seed = 11L, Guidance = g) ]
    // references: each setting restored on its own (stage 1 + encoder + CLIP every time)
    let reference = [ for o in options -> pipe.Run(lq, o) ]
    counting.Calls |> should equal options.Length
    counting.Calls <- 0
    let events = ResizeArray<string>()
    let observe = Action<PipelineEvent>(fun e -> events.Add e.Stage)
    use condition = pipe.Condition(lq, options.Head, observe)
    // From here on CLIP and the VAE encoder are poisoned: any use of them would make c_txt / c_img NaN and the
    // results differ from the references (rgb-space guidance decodes only; the decoder is left alone).
    use _ng = torch.no_grad()
    for p in preset.Pipeline.Cldm.clip.parameters() do p.fill_(nan) |> ignore
    for struct (name, p) in preset.Pipeline.Cldm.vae.named_parameters() do
        if name.StartsWith "encoder." || name.StartsWith "quant_conv." then p.fill_(nan) |> ignore
    let mutable stepCount = 0
    let results =
        [ for o in options ->
            pipe.Sample(condition, o, observe, Func<DiffBIR.Lab.Sampling.StepInfo, bool>(fun _ -> stepCount <- stepCount + 1; true)) ]
    counting.Calls |> should equal 1
    events |> Seq.filter (fun s -> s = "stage1") |> Seq.length |> should equal 1
    events |> Seq.filter (fun s -> s = "c_txt" || s = "uc_txt" || s = "c_img") |> Seq.length |> should equal 3
    events |> Seq.filter (fun s -> s = "image") |> Seq.length |> should equal options.Length
    stepCount |> should equal (2 * options.Length)
    for (r, ref') in List.zip results reference do
        sameTensor r.Image ref'.Image |> should be True
        sameTensor r.Z ref'.Z |> should be True
        sameTensor r.CText ref'.CText |> should be True
    // the settings really differ (the comparison can fail)
    sameTensor results.[0].Z results.[1].Z |> should be False
    for r in results @ reference do r.Dispose()

[<Fact>]
let ``Sample refuses options that change the conditioning and names the option`` () =
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    use lq = testImage ()
    let o = PipelineOptions(Steps = 1, Seed = 3L)
    use condition = preset.Condition(lq, o)
    let ex = Assert.Throws<ArgumentException>(fun () -> preset.Sample(condition, PipelineOptions(Steps = 1, Seed = 3L, PosPrompt = "a photo")) |> ignore)
    ex.Message |> should haveSubstring "PosPrompt"
    let ex2 = Assert.Throws<ArgumentException>(fun () -> preset.Sample(condition, PipelineOptions(Steps = 1, CleanerTiled = true)) |> ignore)
    ex2.Message |> should haveSubstring "CleanerTiled"
    // sampling-only options are fine, and disposing a result leaves the condition usable
    (use r = preset.Sample(condition, PipelineOptions(Steps = 1, Seed = 4L, CfgScale = 2.0, Sampler = "edm_euler")) in r.Image.shape |> should equal [| 1L; 128L; 128L; 3L |])
    use again = preset.Sample(condition, o)
    use whole = preset.Restore(lq, o)
    sameTensor again.Image whole.Image |> should be True

// ------------------------------------------------------------------------------------------------ the sweep engine

open System.Text.Json.Nodes
open DiffBIR.Lab.IO
open DiffBIR.Lab.Sweeps

/// lq.png (32×32) and hq.png (128×128, the ×4 output size) in a folder.
let private writeInputs (dir: string) =
    use lq = testImage ()
    ImageIO.Save(Path.Combine(dir, "lq.png"), lq)
    use hq = TestImages.Card(128, 128)
    ImageIO.Save(Path.Combine(dir, "hq.png"), hq)

let private specJson (grid: string) (fixedOpts: string) =
    sprintf """{"preset": "tiny", "task": "sr", "inputs": [{"lq": "lq.png", "hq": "hq.png"}], "fixed": {%s}, "grid": {%s}}""" fixedOpts grid

let private grid18 = "\"g_scale\": [0.05, 0.2, 0.5], \"g_patch\": [1, 2, 4], \"sampler\": [\"edm_euler\", \"ddim\"]"

let private readRows (dir: string) = ResultsTable.ReadRows(Path.Combine(dir, ResultsTable.JsonlName))

let private ids (rows: seq<JsonObject>) = rows |> Seq.map (fun r -> string r.["point_id"]) |> List.ofSeq

[<Fact>]
let ``a spec expands its grid in order into points with stable ids, and every shard split covers each point once`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let spec = SweepSpec.Parse(specJson grid18 "\"steps\": 1, \"guidance\": \"wmse\"", "s.json", dir.Path)
    let points = SweepPlan.Expand(spec, "tiny", Presets.Tiny.Defaults)
    points.Count |> should equal 18
    // first axis slowest, last fastest
    points.[0].Settings.GScale |> should equal 0.05
    points.[0].Settings.Sampler |> should equal "edm_euler"
    points.[1].Settings.Sampler |> should equal "ddim"
    points.[2].Settings.GPatch |> should equal 2
    points.[17].Settings.GScale |> should equal 0.5
    points |> Seq.forall (fun p -> p.Settings.Steps = 1 && p.Settings.Guidance = "wmse") |> should be True
    points |> Seq.map (fun p -> p.Id) |> Set.ofSeq |> Set.count |> should equal 18
    // ids depend on the point, not on its position: a reordered grid gives the same set
    let reordered = SweepSpec.Parse(specJson "\"sampler\": [\"ddim\", \"edm_euler\"], \"g_patch\": [4, 2, 1], \"g_scale\": [0.5, 0.2, 0.05]" "\"guidance\": \"wmse\", \"steps\": 1", "s.json", dir.Path)
    SweepPlan.Expand(reordered, "tiny", Presets.Tiny.Defaults) |> Seq.map (fun p -> p.Id) |> Set.ofSeq
    |> should equal (points |> Seq.map (fun p -> p.Id) |> Set.ofSeq)
    // ... and on the settings: another seed is another point
    let seeded = SweepSpec.Parse(specJson grid18 "\"steps\": 1, \"guidance\": \"wmse\", \"seed\": 5", "s.json", dir.Path)
    SweepPlan.Expand(seeded, "tiny", Presets.Tiny.Defaults).[0].Id |> should not' (equal points.[0].Id)
    for n in 1 .. 5 do
        for p in points do
            [ for i in 0 .. n - 1 -> SweepShard(i, n).Contains p ] |> List.filter id |> List.length |> should equal 1
    SweepShard.Parse("1/4") |> should equal (SweepShard(1, 4))
    Assert.Throws<OptionException>(fun () -> SweepShard.Parse("4/4") |> ignore) |> ignore
    let env = dict [ "SLURM_ARRAY_TASK_ID", "3"; "SLURM_ARRAY_TASK_MIN", "1"; "SLURM_ARRAY_TASK_COUNT", "4" ]
    SweepShard.FromEnvironment(fun k -> match env.TryGetValue k with | true, v -> v | _ -> null) |> should equal (SweepShard(2, 4))
    SweepShard.FromEnvironment(fun _ -> null) |> should equal SweepShard.All

[<Fact>]
let ``the F# builder makes the same points as the JSON spec`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let fromJson = SweepSpec.Parse(specJson grid18 "\"steps\": 1, \"guidance\": \"wmse\"", "s.json", dir.Path)
    let built =
        SweepSpec.On(Path.Combine(dir.Path, "lq.png"), Path.Combine(dir.Path, "hq.png"))
            .Fixed("steps", 1).Fixed("guidance", "wmse")
            .Grid("g_scale", 0.05, 0.2, 0.5).Grid("g_patch", 1, 2, 4).Grid("sampler", "edm_euler", "ddim")
    let idsOf s = SweepPlan.Expand(s, "tiny", Presets.Tiny.Defaults) |> Seq.map (fun p -> p.Id) |> List.ofSeq
    idsOf built |> should equal (idsOf fromJson)

[<Fact>]
let ``a 3 scales × 3 patch sizes × 2 samplers sweep writes 18 rows with metrics, images and manifests; a rerun skips them`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let out = dir.File "out"
    let spec = SweepSpec.Parse(specJson grid18 "\"steps\": 1, \"guidance\": \"wmse\", \"seed\": 9", "s.json", dir.Path)
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    let progress = ResizeArray<SweepProgress>()
    let summary = SweepRunner.Run(preset, spec, out, SweepRunOptions(Progress = Action<SweepProgress>(progress.Add)))
    summary.Done |> should equal 18
    let rows = readRows out
    rows.Count |> should equal 18
    (File.ReadAllLines(Path.Combine(out, ResultsTable.CsvName))).Length |> should equal 19
    let expected = SweepPlan.Expand(spec, "tiny", Presets.Tiny.Defaults) |> Seq.map (fun p -> p.Id) |> List.ofSeq
    ids rows |> should equal expected
    for r in rows do
        string r.["status"] |> should equal "ok"
        float r.["psnr_hq"] |> should be (greaterThan 0.0)
        float r.["psnr_irm"] |> should be (greaterThan 0.0)
        float r.["ssim_irm"] |> should be (lessThanOrEqualTo 1.0)
        int r.["guided_steps"] |> should equal 1
        r.["guidance_loss_last"] |> should not' (be Null)
        let png = Path.Combine(out, string r.["output"])
        File.Exists png |> should be True
        let manifest = File.ReadAllText(Path.ChangeExtension(png, ".json"))
        Convert.ToHexStringLower(Security.Cryptography.SHA256.HashData(Text.Encoding.UTF8.GetBytes manifest)) |> should equal (string r.["manifest_sha256"])
    // the table records every parameter of the point
    [ for r in rows -> float r.["g_scale"], int r.["g_patch"], string r.["sampler"] ] |> Set.ofList |> Set.count |> should equal 18
    // guidance scale changes the result (so the columns can disagree)
    (rows |> Seq.map (fun r -> float r.["psnr_irm"]) |> Set.ofSeq |> Set.count) |> should be (greaterThan 1)
    progress |> Seq.last |> fun p -> p.Done |> should equal 18
    File.Exists(Path.Combine(out, "manifest.json")) |> should be True
    let again = SweepRunner.Run(preset, spec, out)
    again.Skipped |> should equal 18
    again.Done |> should equal 0
    (readRows out).Count |> should equal 18

[<Fact>]
let ``a partly written last line is cut off and that point runs again`` () =
    use dir = new TempDir()
    let cols = [| "point_id"; "x" |]
    (use t = ResultsTable.Open(dir.Path, cols)
     t.Append(JsonObject(dict [ "point_id", JsonValue.Create("a") :> JsonNode; "x", JsonValue.Create(1.5) ]))
     t.Append(JsonObject(dict [ "point_id", JsonValue.Create("b") :> JsonNode; "x", JsonValue.Create(2) ])))
    let jsonl = Path.Combine(dir.Path, ResultsTable.JsonlName)
    File.AppendAllText(jsonl, "{\"point_id\":\"c\",\"x\":")
    File.AppendAllText(Path.Combine(dir.Path, ResultsTable.CsvName), "c,")
    use t2 = ResultsTable.Open(dir.Path, cols)
    t2.Contains "a" |> should be True
    t2.Contains "c" |> should be False
    t2.Rows.Count |> should equal 2
    File.ReadAllText(jsonl).EndsWith("\n") |> should be True
    File.ReadAllLines(Path.Combine(dir.Path, ResultsTable.CsvName)) |> should equal [| "point_id,x"; "a,1.5"; "b,2" |]
    // a second writer is kept out while the table is open
    Assert.ThrowsAny<IOException>(fun () -> ResultsTable.Open(dir.Path, cols) |> ignore) |> ignore
    // and a table with other columns is refused
    t2.Dispose()
    Assert.Throws<InvalidDataException>(fun () -> ResultsTable.Open(dir.Path, [| "point_id"; "y" |]) |> ignore) |> ignore

[<Fact>]
let ``the sweep CLI killed after its first row resumes to exactly one row per point`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let specFile = dir.File "spec.json"
    File.WriteAllText(specFile, specJson "\"seed\": [1, 2, 3, 4, 5, 6]" "\"steps\": 1, \"guidance\": \"mse\", \"g_scale\": 0.1")
    let out = dir.File "out"
    let dll = Path.Combine(AppContext.BaseDirectory, "diffbir-lab.dll")
    let psi = Diagnostics.ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    for a in [ dll; "sweep"; specFile; "-o"; out; "--threads"; "2"; "--weights"; fixturesDir ] do psi.ArgumentList.Add a
    use p = Diagnostics.Process.Start psi
    p.BeginOutputReadLine(); p.BeginErrorReadLine()
    let jsonl = Path.Combine(out, ResultsTable.JsonlName)
    let lines () = if File.Exists jsonl then File.ReadAllLines(jsonl).Length else 0
    let sw = Diagnostics.Stopwatch.StartNew()
    while lines () < 1 && not p.HasExited && sw.Elapsed.TotalMinutes < 5.0 do Threading.Thread.Sleep 50
    p.HasExited |> should be False
    p.Kill(true)
    p.WaitForExit()
    let before = (readRows out).Count
    before |> should be (greaterThanOrEqualTo 1)
    before |> should be (lessThan 6)
    let code, output = CliTests.run [ "sweep"; specFile; "-o"; out; "--threads"; "2"; "--weights"; fixturesDir ]
    code |> should equal 0
    output |> should haveSubstring (sprintf "%d already there" before)
    let rows = readRows out
    let spec = SweepSpec.Load specFile
    let expected = SweepPlan.Expand(spec, "tiny", Presets.Tiny.Defaults) |> Seq.map (fun p -> p.Id) |> List.ofSeq
    rows.Count |> should equal 6
    ids rows |> List.sort |> should equal (List.sort expected)
    File.ReadAllLines(Path.Combine(out, ResultsTable.CsvName)).Length |> should equal 7

[<Fact>]
let ``two shards merged give the unsharded points with equal values`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let spec = SweepSpec.Parse(specJson "\"g_scale\": [0.1, 0.4], \"seed\": [1, 2], \"sampler\": [\"edm_euler\"]" "\"steps\": 1, \"guidance\": \"wmse\"", "s.json", dir.Path)
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    let whole = SweepRunner.Run(preset, spec, dir.File "all")
    let s0 = SweepRunner.Run(preset, spec, dir.File "s0", SweepRunOptions(Shard = SweepShard(0, 2)))
    let s1 = SweepRunner.Run(preset, spec, dir.File "s1", SweepRunOptions(Shard = SweepShard(1, 2)))
    s0.Done + s1.Done |> should equal whole.Done
    s0.Done |> should equal 2
    let code, output = CliTests.run [ "sweep"; "merge"; dir.File "s0"; dir.File "s1"; "-o"; dir.File "merged" ]
    (code, output) |> should equal (0, output)
    let merged = readRows (dir.File "merged")
    let all = readRows (dir.File "all")
    ids merged |> should equal (ids all)
    for (m, a) in Seq.zip merged all do
        for KeyValue(k, v) in a do
            if not (ResultsTable.Incidental.Contains k) then
                (k, m.[k] |> Option.ofObj |> Option.map (fun n -> n.ToJsonString())) |> should equal (k, v |> Option.ofObj |> Option.map (fun n -> n.ToJsonString()))
        File.Exists(Path.Combine(dir.File "merged", string m.["output"])) |> should be True
    // a point whose values differ between two folders is refused, naming the column
    let tampered = dir.File "tampered"
    Directory.CreateDirectory tampered |> ignore
    let lines = File.ReadAllLines(Path.Combine(dir.File "s0", ResultsTable.JsonlName))
    let row = JsonNode.Parse(lines.[0]).AsObject()
    row.["psnr_irm"] <- JsonValue.Create(1.0)
    File.WriteAllText(Path.Combine(tampered, ResultsTable.JsonlName), row.ToJsonString() + "\n")
    let code2, output2 = CliTests.run [ "sweep"; "merge"; dir.File "s0"; tampered; "-o"; dir.File "merged2" ]
    code2 |> should equal 2
    output2 |> should haveSubstring "psnr_irm"
    Directory.Exists(dir.File "merged2") |> should be False

let private specError (json: string) =
    use dir = new TempDir()
    writeInputs dir.Path
    let ex = Assert.Throws<SweepSpecException>(fun () ->
        let spec = SweepSpec.Parse(json, "bad.json", dir.Path)
        SweepPlan.Expand(spec, "tiny", Presets.Tiny.Defaults) |> ignore)
    ex.Message

[<Fact>]
let ``a bad spec names the file and the field`` () =
    let inputs = "\"inputs\": [\"lq.png\"]"
    specError (sprintf "{%s, \"grid\": {\"g_scael\": [1]}}" inputs) |> should haveSubstring "bad.json: grid.g_scael: unknown option 'g_scael' (known: sampler, steps"
    specError (sprintf "{%s, \"grid\": {\"g_scale\": [0.1, \"x\"]}}" inputs) |> should haveSubstring "bad.json: grid.g_scale[1]: expected a number"
    specError (sprintf "{%s, \"grid\": {\"sampler\": [\"euler\"]}}" inputs) |> should haveSubstring "bad.json: grid.sampler[0]: 'euler' is not one of"
    specError (sprintf "{%s, \"fixed\": {\"steps\": 0}}" inputs) |> should haveSubstring "bad.json: fixed.steps: must be in 1..1000"
    specError (sprintf "{%s, \"grid\": {\"g_schedule\": [\"linear:1\"]}}" inputs) |> should haveSubstring "bad.json: grid.g_schedule[0]:"
    specError (sprintf "{%s, \"grid\": {\"g_norm\": [\"mean\", \"percentile:0\"]}}" inputs) |> should haveSubstring "bad.json: grid.g_norm[1]: 'percentile:0'"
    specError (sprintf "{%s, \"grid\": {\"g_scale\": []}}" inputs) |> should haveSubstring "bad.json: grid.g_scale: expected a non-empty list"
    specError (sprintf "{%s, \"griid\": {}}" inputs) |> should haveSubstring "bad.json: griid: unknown field"
    specError "{\"inputs\": [\"missing.png\"]}" |> should haveSubstring "bad.json: inputs[0]:"
    specError "{\"inputs\": []}" |> should haveSubstring "bad.json: inputs:"
    specError (sprintf "{%s, \"metrics\": [\"nope\"]}" inputs) |> should haveSubstring "bad.json: metrics[0]: unknown metric 'nope'"
    specError "{\"inputs\": [\"lq.png\"], " |> should haveSubstring "bad.json: line 1: not valid JSON"

[<Fact>]
let ``the sweep CLI refuses a bad spec with exit 2 and one error line`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let specFile = dir.File "spec.json"
    File.WriteAllText(specFile, specJson "\"g_scale\": [0.1, true]" "")
    let code, output = CliTests.run [ "sweep"; specFile; "-o"; dir.File "out" ]
    code |> should equal 2
    let errors = output.Split('\n') |> Array.filter (fun l -> l.StartsWith "error:")
    errors |> should equal [| sprintf "error: %s: grid.g_scale[1]: expected a number (got true)" specFile |]
    output |> should not' (haveSubstring "   at ")
    Directory.Exists(dir.File "out") |> should be False

[<Fact>]
let ``points that differ only in their seed run batched and equal their one-at-a-time runs within one level`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let spec = SweepSpec.Parse(specJson "\"seed\": [1, 2, 3]" "\"steps\": 1, \"guidance\": \"mse\", \"g_scale\": 0.2", "s.json", dir.Path)
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    let single = SweepRunner.Run(preset, spec, dir.File "single")
    let batched = SweepRunner.Run(preset, spec, dir.File "batched", SweepRunOptions(BatchSize = 3))
    batched.Done |> should equal 3
    let a = readRows (dir.File "single")
    let b = readRows (dir.File "batched")
    ids b |> should equal (ids a)
    let imageOf folder (r: JsonObject) =
        use img = ImageIO.Load(Path.Combine(dir.File folder, string r.["output"]))
        ImageIO.ToUInt8(img.Image, Quantization.Round).to_type(torch.ScalarType.Int32)
    for (ra, rb) in Seq.zip a b do
        use ia = imageOf "single" ra
        use ib = imageOf "batched" rb
        (ia - ib).abs().max().item<int>() |> should be (lessThanOrEqualTo 1)
        int rb.["guided_steps"] |> should equal 1
        // each point's own loss (per-sample guidance), not the batch's sum
        float rb.["guidance_loss_last"] |> should (equalWithin (1e-3 * float ra.["guidance_loss_last"])) (float ra.["guidance_loss_last"])
        let manifest = JsonNode.Parse(File.ReadAllText(Path.ChangeExtension(Path.Combine(dir.File "batched", string rb.["output"]), ".json")))
        int manifest.["batch"] |> should equal 3
    // the seeds really differ inside the batch
    use i0 = imageOf "batched" b.[0]
    use i1 = imageOf "batched" b.[1]
    (i0 - i1).abs().max().item<int>() |> should be (greaterThan 1)

[<Fact>]
let ``points that differ in guidance scale, patch size and normalisation run as one batch and equal their one-at-a-time runs`` () =
    use dir = new TempDir()
    writeInputs dir.Path
    let grid = "\"g_scale\": [0.0, 0.3], \"g_patch\": [1, 4], \"g_norm\": [\"sum\", \"mean\"]"
    let spec = SweepSpec.Parse(specJson grid "\"steps\": 2, \"sampler\": \"ddim\", \"guidance\": \"wmse\"", "s.json", dir.Path)
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    let single = SweepRunner.Run(preset, spec, dir.File "single")
    let batched = SweepRunner.Run(preset, spec, dir.File "batched", SweepRunOptions(BatchSize = 8))
    batched.Done |> should equal 8
    let a = readRows (dir.File "single")
    let b = readRows (dir.File "batched")
    ids b |> should equal (ids a)
    let imageOf folder (r: JsonObject) =
        use img = ImageIO.Load(Path.Combine(dir.File folder, string r.["output"]))
        ImageIO.ToUInt8(img.Image, Quantization.Round).to_type(torch.ScalarType.Int32)
    for (ra, rb) in Seq.zip a b do
        use ia = imageOf "single" ra
        use ib = imageOf "batched" rb
        (ia - ib).abs().max().item<int>() |> should be (lessThanOrEqualTo 1)
        int rb.["guided_steps"] |> should equal (int ra.["guided_steps"])
        int rb.["guided_steps"] |> should equal 2
        float rb.["guidance_loss_last"] |> should (equalWithin (1e-3 * float ra.["guidance_loss_last"])) (float ra.["guidance_loss_last"])
        let manifest = JsonNode.Parse(File.ReadAllText(Path.ChangeExtension(Path.Combine(dir.File "batched", string rb.["output"]), ".json")))
        int manifest.["batch"] |> should equal 8
        float manifest.["guidance_steps"].[0].["scale"] |> should equal (float rb.["g_scale"])
    // the settings really act inside the batch: the strongest guidance differs from none, and mean from sum
    let find s p n = b |> Seq.find (fun r -> float r.["g_scale"] = s && int r.["g_patch"] = p && string r.["g_norm"] = n)
    use none = imageOf "batched" (find 0.0 1 "sum")
    use strong = imageOf "batched" (find 0.3 1 "sum")
    (none - strong).abs().max().item<int>() |> should be (greaterThan 1)
    float (find 0.3 4 "mean").["psnr_irm"] |> should not' (equal (float (find 0.3 4 "sum").["psnr_irm"]))

[<Fact>]
let ``only seed and guidance settings may differ inside a batch`` () =
    let key (x: SweepSettings) = SweepRunner.BatchKey x
    let g = SweepSettings(Guidance = "wmse")
    key (SweepSettings(Guidance = "wmse", GScale = 0.3, GPatch = 4, GNorm = "mean", Seed = 5L, GSchedule = "linear:0:1", GStart = 500)) |> should equal (key g)
    key (SweepSettings(Guidance = "mse")) |> should equal (key g)
    key (SweepSettings(Guidance = "none")) |> should not' (equal (key g))
    key (SweepSettings(Guidance = "wmse", GSpace = "latent")) |> should not' (equal (key g))
    key (SweepSettings(Guidance = "wmse", GRepeat = 2)) |> should not' (equal (key g))
    key (SweepSettings(Guidance = "wmse", Sampler = "ddim")) |> should not' (equal (key g))
