// The operator's view of the server queue: GET /queue, with cancel buttons (DELETE /queue/{id}).

import {api} from "./api.js";
import {FINAL_STATES as FINAL} from "./states.js";

const byId = (id) => document.getElementById(id);

export class QueuePanel {
  constructor({isMine, onAuthError}) {
    this.isMine = isMine;
    this.onAuthError = onAuthError;
    this.body = byId("queue-table").querySelector("tbody");
    this.status = byId("queue-status");
    this.busy = false;
    byId("queue-refresh").addEventListener("click", () => this.refresh());
    setInterval(() => {
      if (byId("queue-auto").checked && !document.hidden) this.refresh();
    }, 2000);
  }

  async refresh() {
    if (this.busy) return;
    this.busy = true;
    try {
      const data = await api("queue");
      this.render(data.jobs || []);
      // With named keys a user sees its own jobs and only a count of the others' (docs/tenants.md).
      if (data.others != null) this.status.textContent = `Jobs of other API keys on the server: ${data.others}.`;
    } catch (e) {
      if (e.status === 401) this.onAuthError(e);
      this.status.textContent = `Cannot read the queue: ${e.message}`;
    } finally {
      this.busy = false;
    }
  }

  render(jobs) {
    const focusedId = document.activeElement?.dataset?.jobId;
    if (!jobs.length) {
      const row = document.createElement("tr");
      const cell = document.createElement("td");
      cell.colSpan = 6;
      cell.textContent = "No jobs on the server.";
      row.append(cell);
      this.body.replaceChildren(row);
      return;
    }
    this.body.replaceChildren(...jobs.map((job) => {
      const row = document.createElement("tr");
      row.dataset.jobId = job.job_id;
      if (this.isMine(job.job_id)) row.classList.add("mine");
      const id = document.createElement("code");
      id.textContent = job.job_id.slice(0, 8);
      id.title = job.job_id;
      const cells = [id, job.state + (this.isMine(job.job_id) ? " (yours)" : ""), job.current_phase,
                     `${Math.round(job.progress)} %`, job.queue_position ?? "—"];
      for (const c of cells) {
        const td = document.createElement("td");
        if (c instanceof Node) td.append(c); else td.textContent = String(c);
        row.append(td);
      }
      const td = document.createElement("td");
      if (!FINAL.has(job.state)) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = "Cancel";
        b.dataset.jobId = job.job_id;
        b.setAttribute("aria-label", `Cancel job ${job.job_id}`);
        b.addEventListener("click", () => this.cancel(job.job_id));
        td.append(b);
      }
      row.append(td);
      return row;
    }));
    // A refresh must not steal the keyboard user's place.
    if (focusedId) this.body.querySelector(`button[data-job-id="${CSS.escape(focusedId)}"]`)?.focus();
  }

  async cancel(jobId) {
    try {
      const r = await api(`queue/${encodeURIComponent(jobId)}`, {method: "DELETE"});
      this.status.textContent = `Job ${jobId.slice(0, 8)}: ${r.state}.`;
    } catch (e) {
      this.status.textContent = `Job ${jobId.slice(0, 8)}: ${e.message}`;
    }
    await this.refresh();
  }
}
