/// The notebooks are the user's front end: every notebook in notebooks/ must run headlessly, and the runner must
/// stop at (and name) a failing cell.
module DiffBIR.Lab.Tests.NotebookTests

open System
open System.IO
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open DiffBIR.Lab.Cli.Notebooks
open DiffBIR.Lab.Tests.TestSupport

let notebooks : TheoryData<string> =
    let d = TheoryData<string>()
    for f in Directory.GetFiles(Path.Combine(repoRoot, "notebooks"), "*.ipynb") |> Array.sort do d.Add(Path.GetFileName f)
    d

[<Theory>]
[<MemberData(nameof notebooks)>]
let ``notebook runs headlessly from first cell to last`` (name: string) =
    use dir = new TempDir()
    let result = NotebookRunner.Run(Path.Combine(repoRoot, "notebooks", name), NotebookRunOptions(OutputPath = dir.File name))
    Assert.True(result.Succeeded, sprintf "%s failed at cell %A: %s" name result.FailedCell result.Error)
    result.CellsRun |> should equal result.CodeCells
    File.Exists(dir.File name) |> should be True
    // Opened offline (a shared notebook, a cluster without internet), every output must still display: no script is
    // loaded from a URL (charts carry plotly.js), and no F# list renders as a Head / Tail property tree.
    let executed = File.ReadAllText(dir.File name)
    let decoded = System.Net.WebUtility.HtmlDecode(System.Net.WebUtility.HtmlDecode(System.Text.RegularExpressions.Regex.Unescape executed))
    let external = System.Text.RegularExpressions.Regex.Matches(decoded, @"<script[^>]*\bsrc\s*=\s*[""']?(https?:)?//[^""' >]+|require\.config\([^)]*https?://")
    Assert.True(external.Count = 0, sprintf "%s loads scripts from the network: %s" name (external |> Seq.map (fun m -> m.Value) |> Seq.truncate 3 |> String.concat ", "))
    executed |> should not' (haveSubstring "HeadOrDefault")
    executed |> should not' (haveSubstring "TailOrNull")

[<Theory>]
[<MemberData(nameof notebooks)>]
let ``notebook is committed with its outputs cleared`` (name: string) =
    NotebookRunner.HasOutputs(Path.Combine(repoRoot, "notebooks", name)) |> should be False

let private cell (src: string) =
    JsonObject(dict [ "cell_type", JsonValue.Create "code" :> JsonNode
                      "execution_count", null
                      "metadata", JsonObject(dict [ "polyglot_notebook", JsonObject(dict [ "kernelName", JsonValue.Create "fsharp" :> JsonNode ]) :> JsonNode ])
                      "outputs", JsonArray()
                      "source", JsonArray(JsonValue.Create src) ])

[<Fact>]
let ``a failing cell is reported with its number and error, and later cells do not run`` () =
    use dir = new TempDir()
    let marker = dir.File "third-cell-ran.txt"
    let nb =
        JsonObject(dict [ "cells", JsonArray(cell "let x = 40 + 2\nprintfn \"x = %d\" x",
                                             cell "let boom () : unit = failwith \"deliberate failure in cell two\"\nboom ()",
                                             cell (sprintf "System.IO.File.WriteAllText(@\"%s\", \"ran\")" marker)) :> JsonNode
                          "metadata", JsonObject(dict [ "polyglot_notebook", JsonObject(dict [ "defaultKernelName", JsonValue.Create "fsharp" :> JsonNode ]) :> JsonNode ])
                          "nbformat", JsonValue.Create 4
                          "nbformat_minor", JsonValue.Create 2 ])
    let path = dir.File "failing.ipynb"
    File.WriteAllText(path, nb.ToJsonString())
    let result = NotebookRunner.Run(path, NotebookRunOptions(ToolRoot = repoRoot, OutputPath = dir.File "executed.ipynb"))
    result.Succeeded |> should be False
    result.FailedCell |> should equal (Some 2 |> Option.toNullable)
    result.Error |> should haveSubstring "deliberate failure in cell two"
    File.Exists marker |> should be False
    // the executed copy holds the first cell's output and the error
    let executed = File.ReadAllText(dir.File "executed.ipynb")
    executed |> should haveSubstring "x = 42"
    executed |> should haveSubstring "deliberate failure"

let private runLab (args: string list) =
    let psi = System.Diagnostics.ProcessStartInfo("bash", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = repoRoot)
    psi.ArgumentList.Add(Path.Combine(repoRoot, "lab"))
    for a in args do psi.ArgumentList.Add a
    use p = System.Diagnostics.Process.Start psi
    let out, err = p.StandardOutput.ReadToEndAsync(), p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    p.ExitCode, out.Result + err.Result

[<Fact>]
let ``./lab jupyter-kernel writes an F# kernel spec bound to local interfaces`` () =
    use dir = new TempDir()
    let code, out = runLab [ "jupyter-kernel"; "--prefix"; dir.Path ]
    Assert.True((code = 0), out)
    let specPath = Path.Combine(dir.Path, "share", "jupyter", "kernels", "diffbir-lab-fsharp", "kernel.json")
    let spec = JsonNode.Parse(File.ReadAllText specPath)
    let argv = spec.["argv"].AsArray() |> Seq.map (fun n -> n.GetValue<string>()) |> List.ofSeq
    argv |> should contain "--http-local-only"
    argv |> should contain "{connection_file}"
    argv |> should contain "fsharp"
    File.Exists argv.[1] |> should be True
    let code, out = runLab [ "jupyter-kernel"; "--bogus" ]
    code |> should equal 2
    out |> should haveSubstring "--bogus"

[<Fact>]
let ``the set-up notebook runs under jupyter nbconvert with the lab's kernel (where Jupyter is installed)`` () =
    use dir = new TempDir()
    // With Jupyter on the PATH, execute the set-up notebook through the kernel as a user would.
    let jupyter = (Environment.GetEnvironmentVariable "PATH").Split(':') |> Array.exists (fun d -> File.Exists(Path.Combine(d, "jupyter")))
    if not jupyter then Assert.Skip "jupyter is not installed on this machine"
    let code, out = runLab [ "jupyter-kernel"; "--prefix"; dir.Path ]
    Assert.True((code = 0), out)
    let psi = System.Diagnostics.ProcessStartInfo("jupyter", UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Path.Combine(repoRoot, "notebooks"))
    for a in [ "nbconvert"; "--to"; "notebook"; "--execute"; "--ExecutePreprocessor.kernel_name=diffbir-lab-fsharp"; "--ExecutePreprocessor.timeout=600"; "--output-dir"; dir.Path; "00-setup.ipynb" ] do psi.ArgumentList.Add a
    psi.Environment.["JUPYTER_PATH"] <- Path.Combine(dir.Path, "share", "jupyter")
    use p = System.Diagnostics.Process.Start psi
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    Assert.True((p.ExitCode = 0), err.Result)
