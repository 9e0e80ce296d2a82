{{/* Names: the release name, or release-chart, cut to what a StatefulSet's pods allow. */}}
{{- define "mlflow-monitoring.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlflow-monitoring.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mlflow-monitoring.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlflow-monitoring.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlflow-monitoring.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mlflow-monitoring.labels" -}}
helm.sh/chart: {{ include "mlflow-monitoring.chart" . }}
{{ include "mlflow-monitoring.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: exporter
app.kubernetes.io/part-of: mlflow-monitoring
{{- end }}

{{- define "mlflow-monitoring.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlflow-monitoring.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mlflow-monitoring.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secret references: values key -> the variable whose _FILE the mounted file feeds. */}}
{{- define "mlflow-monitoring.secretVariables" -}}
pramathusApiKey: PRAMATHUS_API_KEY
mlflowPassword: MLFLOW_TRACKING_PASSWORD
mlflowToken: MLFLOW_TRACKING_TOKEN
pushgatewayPassword: PROMETHEUS_GATEWAY_PASSWORD
remoteWritePassword: REMOTE_WRITE_PASSWORD
remoteWriteBearerToken: REMOTE_WRITE_BEARER_TOKEN
{{- end }}

{{- define "mlflow-monitoring.probeScheme" -}}
{{- if .Values.web.tls }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{- define "mlflow-monitoring.pullMode" -}}
{{- $prom := .Values.config.prometheus | default dict }}
{{- if and (ne (toString (dig "enabled" true $prom)) "false") (has (dig "mode" "push" $prom) (list "pull" "both")) }}true{{ end }}
{{- end }}
