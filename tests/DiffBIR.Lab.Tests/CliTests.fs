/// The command line, run as a user would (a separate process).
module DiffBIR.Lab.Tests.CliTests

open System.IO
open System.Diagnostics
open Xunit
open FsUnit.Xunit
open DiffBIR.Lab.Tests.TestSupport

/// Runs `diffbir-lab ARGS` (the build output copied beside the tests) and returns exit code and output.
let run (args: string list) =
    let dll = Path.Combine(System.AppContext.BaseDirectory, "diffbir-lab.dll")
    let psi = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    psi.ArgumentList.Add dll
    for a in args do psi.ArgumentList.Add a
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    p.ExitCode, out.Result + err.Result

[<Fact>]
let ``weights inspect lists tensors, dtypes, shapes and counts`` () =
    let code, out = run [ "weights"; "inspect"; fixture "checkpoints/lightning_style.ckpt" ]
    code |> should equal 0
    out |> should haveSubstring "conv.weight"
    out |> should haveSubstring "[4, 3, 3, 3]"
    out |> should haveSubstring "BFloat16"
    out |> should haveSubstring "global_step"

[<Theory>]
[<InlineData("malicious_reduce.pth", "system")>]
[<InlineData("malicious_eval.ckpt", "eval")>]
[<InlineData("truncated.pth", "truncated.pth")>]
let ``weights inspect refuses hostile and broken checkpoints with a clear error`` (file: string, fragment: string) =
    let code, out = run [ "weights"; "inspect"; fixture ("checkpoints/" + file) ]
    code |> should equal 2
    out |> should haveSubstring fragment
    out |> should not' (haveSubstring "   at ") // no stack trace

[<Fact>]
let ``parity exits non-zero when a case is not implemented and zero when all pass`` () =
    use dir = new TempDir()
    let unknown = dir.File "future.safetensors"
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(unknown, System.Collections.Generic.Dictionary(dict [ "out.y", TorchSharp.torch.zeros(2L) ]),
                                            System.Collections.Generic.Dictionary(dict [ "case", "a_case_nobody_implemented" ]))
    let code, out = run [ "parity"; unknown ]
    code |> should equal 1
    out |> should haveSubstring "NOT IMPLEMENTED"
    out |> should haveSubstring "a_case_nobody_implemented"
    let code2, out2 = run [ "parity"; fixture "diffusion_schedule.safetensors"; fixture "checkpoints/expected.json" ]
    code2 |> should equal 0
    out2 |> should haveSubstring "2 passed, 0 failed, 0 not implemented"

[<Fact>]
let ``parity with nothing to check exits 1 with one line, and a caseless file beside a fixture is reported, not hidden`` () =
    use dir = new TempDir()
    let empty = Directory.CreateDirectory(dir.File "empty").FullName
    let caseless = dir.File "weights.safetensors"
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(caseless, System.Collections.Generic.Dictionary(dict [ "out.y", TorchSharp.torch.zeros(2L) ]),
                                            System.Collections.Generic.Dictionary<string, string>())
    File.WriteAllText(dir.File "README.md", "not a fixture")
    for target in [ empty; caseless; dir.Path ] do
        let code, out = run [ "parity"; target ]
        code |> should equal 1
        out.Trim().Split('\n') |> should haveLength 1
        out |> should startWith "error: nothing to check: "
        out |> should haveSubstring (Path.GetFileName target)
    let code, out = run [ "parity"; fixture "diffusion_schedule.safetensors"; caseless ]
    code |> should equal 1
    out |> should haveSubstring "unknown:weights.safetensors"
    out |> should haveSubstring "1 passed, 0 failed, 1 not implemented"

[<Fact>]
let ``the demo restores a degraded test card with the tiny preset when no weights are present`` () =
    use dir = new TempDir()
    let code, out = run [ "demo"; "--fixtures"; fixture "checkpoints"; "--output"; dir.Path; "--weights"; dir.File "none" ]
    Assert.True((code = 0), out)
    out |> should haveSubstring "trained on procedural images"
    File.Exists(dir.File "restored/testcard_lq.png") |> should be True
    File.Exists(dir.File "restored/testcard_lq.json") |> should be True
    File.ReadAllText(dir.File "manifest.json") |> should haveSubstring "\"restore_exit_code\": 0"

[<Fact>]
let ``the weights manifest names a URL and loader for every file each preset needs`` () =
    let m = DiffBIR.Lab.Weights.WeightsManifest.Load(Path.Combine(repoRoot, "weights", "manifest.json"))
    for preset in [ "v1"; "v2"; "v2.1" ] do
        for task in [ "sr"; "face"; "denoise" ] do
            let files = m.FilesFor(preset, task)
            files.Count |> should equal 4
            for f in files do
                f.Url |> should startWith "https://"
                f.Loading |> should not' (be EmptyString)
    (m.FilesFor("v2", "sr") |> Seq.map (fun f -> f.Id) |> List.ofSeq) |> should equal [ "bsrnet"; "sd_v2.1"; "v2"; "bpe_vocab" ]
    (m.FilesFor("v2.1", "sr") |> Seq.map (fun f -> f.Id) |> List.ofSeq) |> should equal [ "swinir_realesrgan"; "sd_v2.1_zsnr"; "v2.1"; "bpe_vocab" ]
    let vocab = File.ReadAllBytes(fixture "bpe_simple_vocab_16e6.txt.gz")
    m.["bpe_vocab"].Sha256 |> should equal (System.Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData vocab))
    m.["bpe_vocab"].SizeBytes |> should equal (System.Nullable(int64 vocab.Length))
    use dir = new TempDir()
    m.Missing(dir.Path, "v2", "face").Count |> should equal 4

[<Fact>]
let ``weights list shows every manifest file and whether it is present`` () =
    use dir = new TempDir()
    File.WriteAllBytes(dir.File "v2.pth", [| 0uy |])
    let code, out = run [ "weights"; "list"; "--weights"; dir.Path; "--manifest"; Path.Combine(repoRoot, "weights", "manifest.json") ]
    code |> should equal 0
    out |> should haveSubstring "v2-1_512-ema-pruned.ckpt"
    out |> should haveSubstring "present"
    out |> should haveSubstring "missing"
